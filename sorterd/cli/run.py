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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sorterd import sdnotify
from sorterd.calibration import checklist as calibrate
from sorterd.cli.compose import MachineParts, open_parts
from sorterd.clock import Clock, make_clock
from sorterd.config import Config
from sorterd.data.bundle import resolve_bundle
from sorterd.data.session import SessionMeta, SessionWriter, new_session_id
from sorterd.domain import BINS, LIGHT_MODES
from sorterd.metrics import Metrics
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder, make_batch_dir
from sorterd.sorting.summary import format_text, summarize

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    stones: int = 500
    json_path: Path | None = None
    progress: bool = True
    record_dir: Path | None = None  # write raw pairs as a §7.1 session under this data dir
    decisions_path: Path | None = None  # one JSON line per stone
    uncalibrated: bool = False  # operator override: sort without today's passing calibration (logged)


@dataclass
class RunResult:
    summary: dict[str, Any]
    batch_dir: Path


def run(cfg: Config, opts: RunOptions, out: TextIO = sys.stderr) -> RunResult:
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
    model = OnnxModel(resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None),
                      cfg.inference.threads, cfg.inference.providers)
    cfg, calibration = calibrate.for_run(cfg, model, out, opts.uncalibrated, rig=_self_calibrating_rig(cfg))
    with contextlib.ExitStack() as stack:
        parts = open_parts(cfg, clock)
        stack.callback(parts.close)
        batch_dir = make_batch_dir(Path(cfg.record.log_dir).expanduser(), _batch_name(cfg))
        _write_batch_info(batch_dir, cfg, model, calibration)
        session = _open_session(cfg, parts, opts.record_dir) if opts.record_dir else None
        if opts.decisions_path is not None:
            opts.decisions_path.parent.mkdir(parents=True, exist_ok=True)
            opts.decisions_path.write_text("")
        metrics = Metrics()
        port = metrics.serve(cfg.metrics.host, cfg.metrics.port) if cfg.metrics.enabled else None
        stack.callback(metrics.close)
        metrics.watch_valves(parts.valves)
        recorder = Recorder(batch_dir, cfg.record.commit_interval_ms / 1e3, cfg.record.queue_size,
                            cfg.record.thumbnail_px, session, opts.decisions_path)
        stack.callback(recorder.close)
        # Callbacks run last-in first-out: the valves go off before anything
        # slower (recorder flush, metrics server shutdown) can delay it.
        stack.callback(parts.valves.close)
        pipeline = Pipeline(cfg, clock, parts, model, recorder, metrics)
        print(f"sorterd: batch {batch_dir}  model {model.version}"
              + (f"  metrics http://{cfg.metrics.host}:{port}/metrics" if port is not None else ""), file=out)
        t_wall = time.monotonic()
        await _run_pipeline(pipeline, parts, clock, opts, out, t_wall)
    # The recorder is closed: the simulator compares the world with what stones.db says.
    truth = parts.machine.truth(recorder.db_path) if parts.machine is not None else None
    summary = summarize(cfg, pipeline.stats, truth, model.version, time.monotonic() - t_wall,
                        valves=parts.valves, lights=parts.lights)
    summary["batch_dir"] = str(batch_dir)
    summary["record"] = {"rows_written": recorder.rows_written, "unseen_written": recorder.unseen_written,
                         "rows_overflow": recorder.rows_overflow, "images_overflow": recorder.images_overflow,
                         "errors": recorder.errors}
    if session is not None:
        summary["recorded_session"] = str(session.dir)
    print(format_text(summary), file=out)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(summary, batch_dir)


def _self_calibrating_rig(cfg: Config) -> calibrate.Rig | None:
    """The simulated machine calibrates itself at every run; a real one brings today's profile."""
    if cfg.camera.type != "sim":
        return None
    from sorterd.sim.rig import SimRig

    return SimRig(cfg)


async def _run_pipeline(pipeline: Pipeline, parts: MachineParts, clock: Clock, opts: RunOptions,
                        out: TextIO, t_wall: float) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, main.cancel if main else (lambda: None))
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    sdnotify.notify("READY=1")
    if parts.machine is not None:
        # Feed the simulated channel only now that every stage is ready.
        parts.machine.feed(opts.stones)
        parts.machine.start_at(clock.now_ns() + 20_000_000)
    reporter = asyncio.create_task(_progress(pipeline, parts, opts, out, t_wall))
    try:
        await pipeline.run()
        if parts.machine is not None:
            # Let the last stones fall into their bins before counting them.
            await clock.sleep_until(parts.machine.last_landing_ns())
    except asyncio.CancelledError:
        print("\nsorterd: stopping (signal)", file=out)
    finally:
        reporter.cancel()
        sdnotify.notify("STOPPING=1")
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


async def _progress(pipeline: Pipeline, parts: MachineParts, opts: RunOptions, out: TextIO, t_wall: float) -> None:
    """A live progress line (and the systemd watchdog ping), on wall time."""
    tty = out.isatty()
    last_line = 0.0
    while True:
        await asyncio.sleep(0.25)
        sdnotify.notify("WATCHDOG=1")
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


def _write_batch_info(batch_dir: Path, cfg: Config, model: OnnxModel, calibration: dict[str, Any]) -> None:
    info = {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cfg.machine.name,
        "config": str(cfg.source) if cfg.source else None,
        "model": {"version": model.version, "sha256": model.manifest.onnx_sha256, "bundle": str(model.bundle)},
        "simulated": cfg.simulated,
        **calibration,
    }
    (batch_dir / "batch.json").write_text(json.dumps(info, indent=2) + "\n")
