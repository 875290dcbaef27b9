"""`sorterd run`: wire the parts, the model, the recorder and the pipeline together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sorterd import journal, sdnotify
from sorterd.calibration import checklist as calibrate
from sorterd.cli.compose import MachineParts, open_parts
from sorterd.clock import Clock, make_clock
from sorterd.config import Config, link_sorter_id
from sorterd.data.bundle import resolve_bundle
from sorterd.data.files import write_json_atomic
from sorterd.data.session import SessionMeta, SessionWriter, new_session_id
from sorterd.domain import BINS, LIGHT_MODES
from sorterd.link.client import ClientOptions, LinkClient, LinkCollector, ReleaseSide
from sorterd.link.keys import load_public, load_secret
from sorterd.link.outbox import Outbox
from sorterd.link.records import SessionRecord
from sorterd.metrics import Metrics
from sorterd.parts.inference import Model
from sorterd.parts.inference.open import open_model
from sorterd.release.download import Downloader, reports_for, rollback_reporter
from sorterd.release.prepare import ChildStager
from sorterd.release.swap import HealthBounds, ReleaseWatcher, kit_policy, open_for_run, open_store
from sorterd.sorting.liveness import Watchdog, keep_alive
from sorterd.sorting.looplag import LoopLag
from sorterd.sorting.looplag import format_line as lag_line
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder, make_batch_dir
from sorterd.sorting.review import Reviewer, ReviewSource
from sorterd.sorting.summary import format_text, summarize

log = logging.getLogger(__name__)

# A stop (SIGINT, SIGTERM) drains for at most this long (wall time on a real machine): the
# stones in flight are decided, fired and recorded; a pulse whose outcome has not come back
# by then is recorded as unknown.  Closing follows (valves off at once, the recorder's last
# commit).  systemd/sorterd.service's TimeoutStopSec must leave room for both.
STOP_DRAIN_S = 5.0
LINK_STOP_S = 2.0  # the link client's stop (LINGER 0: it never waits on a dead trainer)


@dataclass
class RunOptions:
    stones: int = 500
    json_path: Path | None = None
    progress: bool = True
    record_dir: Path | None = None  # write raw pairs as a §7.1 session under this data dir
    decisions_path: Path | None = None  # one JSON line per stone
    uncalibrated: bool = False  # operator override: sort without today's passing calibration (logged)
    link_drain_s: float = 0.0  # after the batch, wait up to this long for the outbox to empty (0: don't wait)


@dataclass
class RunResult:
    summary: dict[str, Any]
    batch_dir: Path
    stop_signal: int | None = None  # the signal that stopped the run (None: it completed)


@dataclass
class Stop:
    """Why a run ends: it completes, or a signal asks it to stop (a second one: at once)."""

    signal: int | None = None
    abandoned: int = 0  # pulses still waiting for their outcome when the drain ran out
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    forced: asyncio.Event = field(default_factory=asyncio.Event)

    def request(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
            self.asked.set()
        else:
            self.forced.set()

    @property
    def reason(self) -> str:
        return "completed" if self.signal is None else f"signal {signal.Signals(self.signal).name}"


def run(cfg: Config, opts: RunOptions, out: TextIO | None = None) -> RunResult:
    # sys.stderr as it is now (a default argument would keep the stream of the first import)
    out = sys.stderr if out is None else out
    # Only a run with no real hardware may skip idle time.
    clock = make_clock(cfg.sim.clock if cfg.offline else "wall")
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(cfg.pipeline.workers, thread_name_prefix="sorterd-worker"))
    try:
        return loop.run_until_complete(_run(cfg, clock, opts, out))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _batch_name(cfg: Config) -> str:
    if cfg.record.batch:
        return cfg.record.batch
    return datetime.now().strftime(f"%Y-%m-%d_{cfg.machine.name}_%H%M%S")


async def _run(cfg: Config, clock: Clock, opts: RunOptions, out: TextIO) -> RunResult:
    # Open what can fail on bad input (model, hardware, session) before
    # creating anything; everything opened is closed on every exit path.
    bundle = resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None)
    # The store's active release if [models] has one (sorterd/release/swap.py), else the bundle;
    # tensorrt: onnxruntime until the engine is live (logged).
    store = open_store(cfg)
    model, running = open_for_run(cfg, store, lambda: open_model(cfg.inference, bundle))
    cfg, calibration = calibrate.for_run(cfg, model, out, opts.uncalibrated, rig=_self_calibrating_rig(cfg))
    stop = Stop()
    with contextlib.ExitStack() as stack:
        parts = open_parts(cfg, clock)
        stack.callback(parts.close)
        batch_dir = make_batch_dir(Path(cfg.record.log_dir).expanduser(), _batch_name(cfg))
        journal.set_context(sorter=cfg.machine.name, batch=batch_dir.name)  # fields of every journal line
        # Pushed first, so it runs last: the final counts once the recorder has flushed.
        batch_log = stack.enter_context(BatchLog(batch_dir / "batch.json", _batch_info(cfg, model, calibration), stop))
        session = _open_session(cfg, parts, opts.record_dir) if opts.record_dir else None
        # After batch.json (so its end counts come after the outbox's last write), before the recorder.
        # The keys first: a bad key file stops the run before anything opens for it (exit 2).
        link_options = _link_options(cfg) if cfg.link.enabled else None
        outbox = _open_outbox(cfg, stack, out) if cfg.link.enabled else None
        if opts.decisions_path is not None:
            opts.decisions_path.parent.mkdir(parents=True, exist_ok=True)
            opts.decisions_path.write_text("")
        metrics = Metrics()
        port = metrics.serve(cfg.metrics.host, cfg.metrics.port) if cfg.metrics.enabled else None
        stack.callback(metrics.close)
        metrics.watch_valves(parts.valves)
        metrics.watch_inference(model)
        recorder = Recorder(batch_dir, cfg.record.commit_interval_ms / 1e3, cfg.record.queue_size,
                            cfg.record.thumbnail_px, session, opts.decisions_path,
                            min_free_bytes=int(cfg.record.min_free_mb * 1e6))
        stack.callback(recorder.close)  # bounded (Recorder.close_timeout_s) whatever the disk does
        metrics.watch_recorder(recorder)
        # Callbacks run last-in first-out: the valves go off before anything
        # slower (recorder flush, metrics server shutdown) can delay it.
        stack.callback(parts.valves.close)
        review, link = None, None
        if outbox is not None and link_options is not None:
            metrics.watch_outbox(outbox)
            review = _start_review(cfg, parts, model, outbox, batch_dir, session)
        pipeline = Pipeline(cfg, clock, parts, model, recorder, metrics, review)
        watcher = None if store is None else ReleaseWatcher(
            store, cfg.inference, pipeline, metrics, HealthBounds.from_config(cfg.models), cfg.models.poll_s, running,
            kit_policy(cfg), cfg.models.prepare_timeout_s)
        # Release results (health rollbacks, downloads) wait in <models.dir>/reports.json for the trainer.
        reports = None if store is None else reports_for(store)
        if watcher is not None and reports is not None:
            watcher.on_rolled_back = rollback_reporter(reports)
        if outbox is not None and link_options is not None:
            # A download's staging (verify + golden + kit) runs in the watcher's kind of helper process.
            releases = None if store is None or reports is None or watcher is None else Downloader(
                store, ChildStager(store, cfg.inference, kit_policy(cfg), cfg.models.prepare_timeout_s), reports,
                auto_activate=cfg.models.auto_activate, running=lambda: watcher.running if watcher is not None else None,
                on_refused=lambda check: metrics.model_refusals.labels(check).inc())
            link = _start_link(link_options, outbox, metrics, releases)
        batch_log.counts = lambda: _final_counts(pipeline, parts, recorder, clock, outbox)
        print(f"sorterd: batch {batch_dir}  model {model.version} on {model.backend}"
              + (f"  metrics http://{cfg.metrics.host}:{port}/metrics" if port is not None else ""), file=out)
        probe = LoopLag(metrics.loop_lag)  # the loop's own lateness, for the metrics and the summary
        t_wall = time.monotonic()
        linger_s = cfg.metrics.linger_s if port is not None else 0.0
        try:
            t_wall += await _run_pipeline(pipeline, parts, clock, opts, out, stop, t_wall, linger_s, watcher, probe)
            if link is not None and opts.link_drain_s > 0 and outbox is not None:
                t_wall += await _drain_link(link, outbox, opts.link_drain_s, stop, out)
        finally:
            if link is not None:
                await link.close()  # before the outbox closes (the stack's callback, below)
    # The recorder is closed: the simulator compares the world with what stones.db says.
    truth = parts.machine.truth(recorder.db_path) if parts.machine is not None else None
    summary = summarize(cfg, pipeline.stats, truth, model.version, time.monotonic() - t_wall,
                        valves=parts.valves, lights=parts.lights)
    summary["batch_dir"] = str(batch_dir)
    summary["record"] = recorder.summary()
    if session is not None:
        summary["recorded_session"] = str(session.dir)
    summary["stop"] = {"reason": stop.reason, "abandoned_pulses": stop.abandoned}
    summary["event_loop_lag"] = probe.summary()
    if outbox is not None:
        summary["link"] = outbox.summary()
        if link is not None:
            summary["link"]["client"] = asdict(link.client.stats)
    print(format_text(summary), file=out)
    print(lag_line(summary["event_loop_lag"]), file=out)
    if outbox is not None:
        print(_link_line(summary["link"]), file=out)
    if stop.signal is not None:
        print(f"stopped by {stop.reason}: counted are the stones fed before the stop"
              + (f"; {stop.abandoned} pulse(s) recorded with an unknown outcome" if stop.abandoned else ""), file=out)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(summary, batch_dir, stop.signal)


def _self_calibrating_rig(cfg: Config) -> calibrate.Rig | None:
    """The simulated machine calibrates itself at every run; a real one brings today's profile."""
    if cfg.camera.type != "sim":
        return None
    from sorterd.sim.rig import SimRig

    return SimRig(cfg)


async def _run_pipeline(pipeline: Pipeline, parts: MachineParts, clock: Clock, opts: RunOptions,
                        out: TextIO, stop: Stop, t_wall: float, linger_s: float = 0.0,
                        watcher: ReleaseWatcher | None = None, probe: LoopLag | None = None) -> float:
    """Sort until the input ends, or until a signal: then stop the input and drain (bounded).
    `watcher` swaps in what the release store activates meanwhile.  With linger_s, the finished
    batch's metrics stay served that long (a signal ends it at once); returns the seconds spent
    lingering (not part of the run's wall time)."""
    loop = asyncio.get_running_loop()
    signals = _handle_signals(loop, stop)
    sdnotify.notify("READY=1\nSTATUS=sorting")
    if parts.machine is not None:
        # Feed the simulated channel only now that every stage is ready.
        parts.machine.feed(opts.stones)
        parts.machine.start_at(clock.now_ns() + 20_000_000)
    reporter = asyncio.create_task(_progress(pipeline, parts, opts, out, t_wall))
    # WATCHDOG=1 only while every stage moves or is idle (sorting/liveness.py).
    watchdog = Watchdog([*pipeline.liveness(), pipeline.recorder], pipeline.cfg.service.stall_s)
    pinger = asyncio.create_task(keep_alive(watchdog, sdnotify.notify))
    work = asyncio.create_task(_sort_and_land(pipeline, parts, clock))
    asked = asyncio.create_task(stop.asked.wait())
    releases = asyncio.create_task(watcher.run() if watcher is not None else asyncio.sleep(0))
    lag = asyncio.create_task(probe.run() if probe is not None else asyncio.sleep(0))
    try:
        await asyncio.wait({work, asked}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            await _drain(work, pipeline, parts, clock, stop, out)
        if not work.cancelled():
            work.result()  # a stage's error ends the run here
        t_linger = time.monotonic()
        if linger_s > 0 and not stop.asked.is_set():
            # The batch is complete: a signal now only ends the wait (the run still exits 0).
            ended = asyncio.Event()
            for sig in signals:
                loop.add_signal_handler(sig, ended.set)
            sdnotify.notify("STATUS=batch done, serving its final metrics")
            waiting = asyncio.create_task(ended.wait())
            await asyncio.wait({waiting}, timeout=linger_s)  # a skip on the virtual clock
            waiting.cancel()
        return time.monotonic() - t_linger
    finally:
        for task in (reporter, pinger, asked, work, releases, lag):
            task.cancel()
        sdnotify.notify("STOPPING=1")
        for sig in signals:
            loop.remove_signal_handler(sig)


def _handle_signals(loop: asyncio.AbstractEventLoop, stop: Stop) -> list[int]:
    """SIGINT and SIGTERM ask for a stop; the signals handled (none off the main thread: tests)."""
    handled: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.request, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return handled


async def _sort_and_land(pipeline: Pipeline, parts: MachineParts, clock: Clock) -> None:
    await pipeline.run()
    if parts.machine is not None:
        # Let the last stones fall into their bins before counting them.
        await clock.sleep_until(parts.machine.last_landing_ns())


async def _drain(work: asyncio.Task[None], pipeline: Pipeline, parts: MachineParts, clock: Clock,
                 stop: Stop, out: TextIO) -> None:
    """A stop: no new stones (the simulated feeder stops; a real machine's trigger input is
    closed), then everything in flight is decided, fired and recorded, for at most
    STOP_DRAIN_S or until a second signal; what still waits for its valve is recorded unknown."""
    name = stop.reason.removeprefix("signal ")
    print(f"\nsorterd: {name}: stopping: no new stones; the stones in flight are finished "
          f"(at most {STOP_DRAIN_S:.0f} s; {name} again stops at once)", file=out, flush=True)
    sdnotify.notify(f"STOPPING=1\nSTATUS=stopping ({name}): finishing the stones in flight")
    if parts.machine is not None:
        parts.machine.stop_feed(clock.now_ns())
    else:
        pipeline.stop_input()
    forced = asyncio.create_task(stop.forced.wait())
    await asyncio.wait({work, forced}, timeout=STOP_DRAIN_S, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if work.done():
        return
    stop.abandoned = pipeline.abandon()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    log.warning("stop: the drain was cut short; %d pulse(s) recorded with an unknown outcome", stop.abandoned)


async def _progress(pipeline: Pipeline, parts: MachineParts, opts: RunOptions, out: TextIO, t_wall: float) -> None:
    """A live progress line, on wall time (the systemd watchdog ping: liveness.keep_alive)."""
    tty = out.isatty()
    last_line = 0.0
    while True:
        await asyncio.sleep(0.25)
        if not opts.progress:
            continue
        now = time.monotonic()
        if not tty and now - last_line < 5.0:
            continue
        last_line = now
        line = _progress_line(pipeline, parts, opts, now - t_wall)
        print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", file=out, flush=True)


def _progress_line(pipeline: Pipeline, parts: MachineParts, opts: RunOptions, elapsed: float) -> str:
    s = pipeline.stats
    fed = ""
    if parts.machine is not None:
        fed = f"fed {parts.machine.fed_by(pipeline.clock.now_ns())}/{opts.stones}  "
    bins = " ".join(f"{b} {s.decided[b]}" for b in BINS)
    recent = s.latency_s["compute"].recent(500)
    p50 = f"{statistics.median(recent) * 1e3:.1f} ms" if recent else "-"
    return (f"[{elapsed:6.1f} s] {fed}decided {s.objects} | {bins} | flagged {s.flagged} | "
            f"misses {s.deadline_misses} | compute p50 {p50}")


def _open_session(cfg: Config, parts: MachineParts, data_dir: Path) -> SessionWriter:
    """`--record DIR`: a new §7.1 session with this run's scale and reference frames."""
    cam = parts.camera
    meta = SessionMeta(
        session_id=new_session_id(data_dir), timestamp_start=datetime.now().astimezone().isoformat(timespec="seconds"),
        pixels_per_mm=cam.pixels_per_mm, reference_check_passed=False,
        pair_interval_ms=float(cam.pair_interval_ms or cfg.lights.pair_interval_ms),
        notes=f"recorded by sorterd run on {cfg.machine.name}",
    )
    writer = SessionWriter(data_dir, meta)
    for mode in LIGHT_MODES:
        writer.write_reference(mode, cam.reference(mode))
    return writer


def _open_outbox(cfg: Config, stack: contextlib.ExitStack, out: TextIO) -> Outbox:
    """link.enabled: the durable outbox, closed at exit within its bound (what it could not
    write is counted and said here).  An outbox that cannot open raises OutboxError (exit 2)."""
    outbox = Outbox(Path(cfg.link.outbox_dir).expanduser(), int(cfg.link.outbox_quota_mb * 1e6))

    def close() -> None:
        lost = outbox.close()
        if lost:
            print(f"sorterd: LINK: {lost} record(s) for the trainer were still queued and could not be "
                  f"written to {outbox.db_path} before the exit: they are lost", file=out, flush=True)

    stack.callback(close)
    return outbox


def _start_review(cfg: Config, parts: MachineParts, model: Model, outbox: Outbox, batch_dir: Path,
                  session: SessionWriter | None) -> Reviewer:
    """The run's session record (§2.4 meta with pixels_per_mm, the reference frames), queued
    before any stone, and the pipeline's reviewer that queues its stones."""
    cam = parts.camera
    batch = batch_dir.name.removeprefix("batch_")
    if session is not None:
        meta = session.meta
    else:  # not recording: the run is the session, named after its batch
        meta = SessionMeta(
            session_id=batch, timestamp_start=datetime.now().astimezone().isoformat(timespec="seconds"),
            pixels_per_mm=cam.pixels_per_mm, reference_check_passed=False,
            pair_interval_ms=float(cam.pair_interval_ms or cfg.lights.pair_interval_ms),
            notes=f"sorted by sorterd run on {cfg.machine.name}")
    sorter_id = link_sorter_id(cfg)
    record = SessionRecord(sorter_id=sorter_id, batch=batch, session_id=meta.session_id, meta=asdict(meta))
    outbox.submit_session(record, {f"reference_{m}": cam.reference(m) for m in LIGHT_MODES})
    return Reviewer(outbox, ReviewSource(
        sorter_id=sorter_id, batch=batch, session_id=meta.session_id, lot_id=meta.lot_id,
        model_version=model.version, pixels_per_mm=cam.pixels_per_mm, crop_mm=model.manifest.crop_mm,
        drift_every=cfg.link.drift_every))


def _link_options(cfg: Config) -> ClientOptions:
    """[link] as the client's options; the key files are read (and their modes checked) here:
    a missing, malformed or group/world-readable key raises KeyFileError (exit 2)."""
    lk = cfg.link
    public, secret = load_secret(Path(lk.secret_key).expanduser())
    return ClientOptions(endpoint=lk.trainer, server_public_key=load_public(Path(lk.trainer_key).expanduser()),
                         public_key=public, secret_key=secret, window=lk.send_window, heartbeat_s=lk.heartbeat_s,
                         ack_timeout_s=lk.ack_timeout_s, reconnect_max_s=lk.reconnect_max_s,
                         sorter_id=link_sorter_id(cfg))


@dataclass
class RunningLink:
    """The link client's task beside the pipeline: it only reads the outbox (through threads),
    so nothing it does can delay a stone; `close` stops it within LINK_STOP_S."""

    client: LinkClient
    task: asyncio.Task[None]

    async def close(self) -> None:
        self.client.stop()
        done, _ = await asyncio.wait({self.task}, timeout=LINK_STOP_S)
        if not done:
            self.task.cancel()
            log.error("link: the client did not stop within %.0f s; cancelled", LINK_STOP_S)
        elif not self.task.cancelled() and (exc := self.task.exception()) is not None:
            log.error("link: the client failed: %s (records stay in the outbox for the next run)", exc)


def _start_link(options: ClientOptions, outbox: Outbox, metrics: Metrics,
                releases: ReleaseSide | None = None) -> RunningLink:
    client = LinkClient(options, outbox, releases)
    metrics.registry.register(LinkCollector(client))
    log.info("link: sending to the trainer at %s from %s", options.endpoint, outbox.db_path)
    return RunningLink(client, asyncio.create_task(client.run(), name="sorterd-link"))


async def _drain_link(link: RunningLink, outbox: Outbox, limit_s: float, stop: Stop, out: TextIO) -> float:
    """`run --link-drain S`: the batch is done; wait (at most S, or until a signal) for the trainer to
    acknowledge what the outbox holds.  Returns the seconds waited (not part of the run's wall time)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s and not stop.asked.is_set():
        if outbox.depth()[0] == 0 and link.client.in_flight == 0:
            break
        await asyncio.sleep(0.1)
    entries, _ = outbox.depth()
    if entries:
        print(f"sorterd: LINK: {entries} record(s) still wait in the outbox after --link-drain "
              f"{limit_s:g} s (trainer {'connected' if link.client.stats.connected else 'not reached'}); "
              "the next run sends them", file=out, flush=True)
    return time.monotonic() - t0


def _link_line(link: dict[str, Any]) -> str:
    pend = link["pending"]
    dropped = ", ".join(f"{k} {n}" for k, n in link["dropped"].items() if n) or "none"
    return (f"link: {link['queued']} record(s) queued, {link['delivered']} delivered this run, dropped: {dropped}; "
            f"waiting in the outbox: {pend.get('flagged', 0)} flagged stone(s), {pend.get('drift', 0)} drift, "
            f"{pend.get('session', 0)} session(s) ({pend['bytes'] / 1e6:.1f} MB)")


def _batch_info(cfg: Config, model: Model, calibration: dict[str, Any]) -> dict[str, Any]:
    return {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cfg.machine.name,
        "config": str(cfg.source) if cfg.source else None,
        "model": {"version": model.version, "sha256": model.manifest.onnx_sha256,
                  "bundle": str(resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None)),
                  "backend_at_start": model.backend},
        "simulated": cfg.simulated,
        **calibration,
    }


class BatchLog:
    """batch.json: written when the batch starts, and again when it ends (however it ends)
    with the end time, the stop reason (completed, signal SIGINT/SIGTERM, error: ...) and the
    final counts.  Both times by atomic rename: a reader never sees half a file."""

    def __init__(self, path: Path, info: dict[str, Any], stop: Stop) -> None:
        self.path = path
        self.info = info
        self.stop = stop
        self.counts: Callable[[], dict[str, Any]] = dict
        write_json_atomic(path, info)

    def __enter__(self) -> BatchLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        end: dict[str, Any] = {"ended": datetime.now().astimezone().isoformat(timespec="seconds"),
               "stop_reason": self.stop.reason if exc is None else _error_reason(exc)}
        try:
            end["counts"] = self.counts()
        except Exception as err:  # noqa: BLE001 -- the end time and the reason still get written
            log.exception("batch.json: counting at the end failed")
            end["counts"] = {"error": f"{type(err).__name__}: {err}"}
        try:
            write_json_atomic(self.path, {**self.info, **end})
        except (OSError, ValueError):
            log.exception("could not write the end of the batch to %s", self.path)


def _error_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):  # a Ctrl-C before the stop handlers were installed
        return "signal SIGINT"
    return f"error: {type(exc).__name__}: {exc}"


def _final_counts(pipeline: Pipeline, parts: MachineParts, recorder: Recorder, clock: Clock,
                  outbox: Outbox | None = None) -> dict[str, Any]:
    """What the batch holds when it ends (the recorder has flushed by then)."""
    s = pipeline.stats
    counts: dict[str, Any] = {
        "objects_decided": s.objects, "decided": dict(s.decided), "flagged": s.flagged,
        "deadline_misses": s.deadline_misses, "valve_unknown": s.valve_unknown, "passed_unseen": s.passed_unseen,
        "rows_written": recorder.rows_written, "unseen_written": recorder.unseen_written,
        "rows_overflow": recorder.rows_overflow, "record_errors": recorder.errors,
    }
    if parts.machine is not None:
        counts["stones_fed"] = parts.machine.fed_by(clock.now_ns())
    if outbox is not None:  # closed by now (its callback runs before this one)
        counts["link"] = outbox.summary()
    return counts
