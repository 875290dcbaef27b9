"""The sorting pipeline: one asyncio daemon, stages connected by bounded queues.

  trigger ──▶ [trigger queue] ──▶ capture pair ──▶ [pair queue] ──▶ process
  process = segment (worker) → track → crop+infer (worker) → decide → plan
            pulse → valves → (outcome) → record (writer threads)

Threads: the event loop owns all pipeline state (tracker, planner, pending
stones, stats); segmentation, cropping and inference run in the default
executor; SQLite and image files have their own writer threads.  Nothing on
the loop blocks.  Overflow of either queue is counted; the stones it
concerns take the default trajectory (REJECT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from sorterd.clock import Clock
from sorterd.config import Config
from sorterd.controller.outputs import Pulse
from sorterd.data.crops import crop_px
from sorterd.data.session import PairTimes, pair_stone_ids
from sorterd.domain import JET_BINS, LIGHT_MODES
from sorterd.metrics import Metrics
from sorterd.parts import Parts
from sorterd.parts.camera import CameraError, FramePair, RecordedFrameError
from sorterd.parts.inference import Model, Prediction
from sorterd.parts.inference.live import LiveModel
from sorterd.parts.lights import StrobeError, strobe_edges
from sorterd.parts.trigger import TriggerEvent
from sorterd.quantiles import Samples
from sorterd.sorting.capture import capture_pair, lighting_fault
from sorterd.sorting.decide import decide, safe_route, unsortable_reason
from sorterd.sorting.drift import DriftWatch
from sorterd.sorting.eject import Planner, plan_pulse
from sorterd.sorting.ledger import TriggerLedger
from sorterd.sorting.liveness import Liveness
from sorterd.sorting.neighbours import Neighbours, Pending, Routed
from sorterd.sorting.record import ImageJob, Recorder, StoneRow, UnseenRow, stone_row, wall_time_iso
from sorterd.sorting.review import Reviewer
from sorterd.sorting.segment import Observation, PairingLimits, crop_halves, segment_pair
from sorterd.sorting.stats import RunCounter
from sorterd.sorting.track import Known, Track, Tracker, is_known
from sorterd.sorting.trigger_queue import TriggerQueue

log = logging.getLogger(__name__)



# A stone's trigger edge and the exposure of a pair that shows it are at most this far
# apart (it is in view 50-200 ms); an edge no pair exposed this much later explains is a
# stone passed unseen.  Counted from exposures, not the clock: queueing does not count.
LEDGER_HORIZON_NS = 1_000_000_000
# A stone's computed crossing vs its edge: the front found in the frame (a pixel or
# two) and a beam's own width and threshold.
LEDGER_TOLERANCE_MM = 0.5
MIN_STONE_MM = 1.0  # melee: nothing smaller is sorted


def _recent_p99_ms(samples: Samples, n: int = 100) -> float:
    """p99 of the last n samples (cheap on the loop; the lag that lost the stones is recent)."""
    recent = samples.recent(n)
    return float(np.percentile(recent, 99)) * 1e3 if recent else float("nan")


@dataclass
class Computed:
    """What a worker made of one frame pair: the new objects and their classes."""

    new: list[Observation]
    reasons: list[str]  # why an object cannot be classified ('' = it can)
    crops: list[tuple[np.ndarray, np.ndarray]]  # (backlit, toplit) BGR crop per new object
    preds: dict[int, Prediction]
    segment_s: float
    infer_s: float
    model_s: float
    skipped: dict[str, int]  # regions found but not decided, by reason (the summary's not_decided)
    model: Model  # the release that classified this pair: its rows record its version, decide uses its class order


class Pipeline:
    def __init__(self, cfg: Config, clock: Clock, parts: Parts, model: Model,
                 recorder: Recorder, metrics: Metrics, review: Reviewer | None = None) -> None:
        self.cfg = cfg
        self.review = review  # stones for the trainer (link.enabled); None: none are sent
        self.clock = clock
        self.parts = parts
        # The live model, read once per pair (`LiveModel.current()`): a release swapped in
        # (`swap_model`, sorterd/release/swap.py) classifies the next pair, never half of one.
        self.model = model if isinstance(model, LiveModel) else LiveModel(model)
        self.row_observers: list[Callable[[StoneRow], None]] = []  # each finished row (the release health watch)
        self.recorder = recorder
        self.count = RunCounter(metrics)  # every figure and Prometheus series goes through it
        self.stats = self.count.stats  # read by the summary and the progress line
        self.planner = Planner(cfg.geometry, cfg.ejection)
        self.tracker = Tracker(cfg.pipeline.track_tolerance_mm)
        self.pending: dict[str, Pending] = {}
        self.neighbours = Neighbours(self.planner, self.pending, parts.valves, self.count, cfg.machine.safe_route)
        self.record_pairs = recorder.session is not None
        self._next_id = 1
        self._triggers = TriggerQueue(maxsize=16)
        self._pairs: asyncio.Queue[FramePair | None] = asyncio.Queue(maxsize=cfg.pipeline.queue_size)
        self._outcomes: set[asyncio.Task[None]] = set()
        self._input_stopped = False  # stop_input() was called: the trigger loop ends, the rest drains
        self._trigger_task: asyncio.Task[None] | None = None
        # What the systemd watchdog reads (sorting/liveness.py): loop thread only.
        self.capture_live = Liveness("capture")
        self.process_live = Liveness("process")
        self.valves_live = Liveness("valves")
        cam = parts.camera
        # A replayed session brings its own pair interval; otherwise the strobes' setting.
        self.pair_interval_ms = float(cam.pair_interval_ms or cfg.lights.pair_interval_ms)
        self._refs = {m: cam.reference(m) for m in LIGHT_MODES}
        self._limits = PairingLimits.from_config(cfg, cam.pixels_per_mm, self.pair_interval_ms)
        # Where a stone's front is when its trigger fires, and how late the edge may be stamped.
        self._trigger_front_mm = cfg.trigger.front_mm
        self._trigger_slack_ns = cfg.trigger.slack_ns
        self.ledger = None if self._trigger_front_mm is None else TriggerLedger(
            self._trigger_slack_ns, LEDGER_HORIZON_NS)
        size = model.manifest.size
        self._input_px = int(size[0])
        self._crop_px = crop_px(model.manifest.crop_mm, cam.pixels_per_mm)
        self._sized_for = model.manifest
        self.count.model(model.version, model.manifest.onnx_sha256)
        self.drift = DriftWatch(model.manifest.ood)
        self.stats.ood = self.drift.summary()
        if not self.drift.gate:
            log.warning("model %s has no out-of-distribution gate (a bundle older than v003): stones unlike its "
                        "training data are sorted by their softmax alone", model.version)

    # -- stage 1: triggers ----------------------------------------------------

    async def _trigger_loop(self) -> None:
        try:
            while (ev := await self.parts.trigger.next()) is not None:
                if self.ledger is not None:
                    self.ledger.edge(ev.t_ns, ev.earliest_ns)  # queued or not, it is a stone to account for
                if not self._triggers.put_nowait(ev):
                    # The stone is still in view: the next pair will show it.
                    self.count.trigger_dropped()
        except asyncio.CancelledError:
            if not self._input_stopped:
                raise
        self._triggers.put_nowait(None)  # end of input: what is queued still goes through

    # -- stage 2: capture -----------------------------------------------------

    async def _capture_loop(self) -> None:
        seq = 0
        while (ev := await self._triggers.get()) is not None:
            self.capture_live.begin()
            try:
                pair = await self._capture(seq, ev)
            except RecordedFrameError as exc:
                # Replay: the recorded file is bad, not the camera; its trigger was not lost.
                self.count.unreadable_pair()
                log.error("replay: pair skipped, its stones are not decided: %s", exc)
                continue
            except CameraError as exc:
                await self._camera_lost(exc)
                continue
            except StrobeError as exc:
                # No light, no picture worth sorting: the stone falls to REJECT.
                self.count.lighting_fault()
                log.error("capture %d: strobe refused (%s): its stone falls to REJECT", seq, exc)
                continue
            finally:
                self.capture_live.end()
            seq += 1
            self._triggers.drop_covered(pair.backlit.t_ns)
            self.count.captured((pair.backlit.t_ns - ev.t_ns) / 1e9)
            try:
                self._pairs.put_nowait(pair)
            except asyncio.QueueFull:
                self.count.pair_dropped()
                log.warning("pair queue full: capture %d dropped, its stones fall to REJECT", pair.seq)
            self.count.queue_depth("pairs", self._pairs.qsize())
        await self._pairs.put(None)

    async def _camera_lost(self, exc: Exception) -> None:
        """Count the gap and get the camera back; stones passing meanwhile are never
        seen, get no pulse and fall to REJECT (the default trajectory)."""
        self.count.camera_failure()
        lost = 1  # the trigger whose capture failed
        log.error("camera lost (%s): stones fall to REJECT until it is back", exc)
        backoff_ns = int(self.cfg.camera.reopen_backoff_ms * 1e6)
        loop = asyncio.get_running_loop()
        while True:
            lost += len(self._triggers.drop_covered(self.clock.now_ns()))
            # A reopen that fails is progress (the sorter is retrying); one that never returns is not.
            self.capture_live.begin()
            try:
                async with self.parts.camera.lock:  # the vision trigger may be reopening it too
                    await loop.run_in_executor(None, self.parts.camera.reopen)
                break
            except CameraError as again:
                log.debug("camera reopen failed: %s", again)
            finally:
                self.capture_live.end()
            await self.clock.sleep_until(self.clock.now_ns() + backoff_ns)
        # Triggers that came while it was away announce stones already past.
        lost += len(self._triggers.drop_covered(self.clock.now_ns()))
        self.count.gap_triggers(lost)
        log.warning("camera back: %d triggers (stones) lost in the gap", lost)

    async def _capture(self, seq: int, ev: TriggerEvent) -> FramePair:
        """§2.2: backlit strobe + frame at t0, ring light + frame at t0+10 ms, dark by t0+20 ms."""
        return await capture_pair(self.parts.camera, self.parts.lights, self.clock, seq, ev.t_ns,
                                  int(self.pair_interval_ms * 1e6), int(self.cfg.lights.lights_off_ms * 1e6))

    # -- stage 3: process -----------------------------------------------------

    async def _process_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (pair := await self._pairs.get()) is not None:
            self.count.queue_depth("pairs", self._pairs.qsize())
            self.process_live.begin()
            try:
                await self._process(loop, pair)
            finally:
                self.process_live.end()
        self._settle(None)  # end of input: edges nothing explained by now never will be

    async def _process(self, loop: asyncio.AbstractEventLoop, pair: FramePair) -> None:
        """One pair: compute in a worker, then decide, plan and fire each new stone in it."""
        # One worker call per pair: the frames stay in that core's cache
        # from segmentation to inference, and there is one hand-off only.
        done: Computed = await loop.run_in_executor(None, self._compute, pair, self.tracker.snapshot())
        self.count.not_decided(done.skipped, empty=not done.new)
        fault, strobes = await lighting_fault(pair, self.clock, self.parts.camera, self.parts.lights)
        edges = strobe_edges(strobes)
        if fault:
            # Frames not lit as §2.2 says cannot be trusted: the pair's stones take the safe route.
            self.count.lighting_fault()
            log.error("capture %d: %s: its %d stone(s) take the safe route", pair.seq, fault, len(done.new))
            done.preds.clear()
            done.reasons[:] = [f"lighting: {fault}"] * len(done.new)
        for i, (sid, obs) in enumerate(zip(self._stone_ids(pair, len(done.new)), done.new, strict=True)):
            t = time.perf_counter()
            routed, pulse = self._decide_and_plan(sid, obs, done.preds.get(i), done.reasons[i], done.model)
            if i == 0 and self.record_pairs:
                self._record_pair(sid, pair, edges)
            decide_s = time.perf_counter() - t
            self._dispatch(sid, pair, obs, done.preds.get(i), routed, pulse, done.crops[i], edges, done.model.version)
            if i in done.preds:
                self.count.stage_latencies(done.segment_s, done.infer_s, decide_s, done.model_s)
            self.count.exposure_to_pulse((self.clock.now_ns() - obs.t_ns) / 1e9)
            self._account(obs)
        self.planner.forget_before(self.clock.now_ns())
        # Every pair exposed up to this one is decided (pairs are processed in order); the
        # clock would close the ledger's books early whenever processing lags behind.
        self._settle(pair.backlit.t_ns)

    def _account(self, obs: Observation) -> None:
        """The ledger: when did this object's front cross the trigger's place?"""
        if self.ledger is None or obs.speed_mm_s <= 0 or self._trigger_front_mm is None:
            return
        x, _, w, _ = obs.toplit.bbox
        front_mm = (x + w) / self._limits.pixels_per_mm
        first = obs.t_ns + int((self._trigger_front_mm - front_mm) / obs.speed_mm_s * 1e9)
        span = int(w / self._limits.pixels_per_mm / obs.speed_mm_s * 1e9)  # its length passing
        tol = int(LEDGER_TOLERANCE_MM / obs.speed_mm_s * 1e9) + self._trigger_slack_ns
        # A cluster's stones cross one after the other: the last one's front comes at
        # most its length less the smallest stone's after the first one's.
        last = first + max(0, span - int(MIN_STONE_MM / obs.speed_mm_s * 1e9)) if obs.cluster else None
        behind = int(self.cfg.decision.max_single_length_mm / obs.speed_mm_s * 1e9)
        self.ledger.decided(first, last, span, tol, behind)

    def _settle(self, now_ns: int | None) -> None:
        if self.ledger is None:
            return
        before = self.ledger.counts.untriggered
        unseen = self.ledger.close() if now_ns is None else self.ledger.settle(now_ns)
        untriggered = self.ledger.counts.untriggered - before
        if unseen:
            self.count.passed_unseen(len(unseen))
            p99 = _recent_p99_ms(self.stats.latency_s["trigger_to_exposure"])
            reason = f"passed unseen: no decided stone explains its trigger edge (trigger to exposure p99 {p99:.0f} ms)"
            counted = self.clock.now_ns()
            for t_ns in unseen:
                self.recorder.submit(UnseenRow(t_ns, counted, wall_time_iso(), reason))
            log.warning("%d stone(s) passed unseen (recorded in the batch's unseen table): no pulse, the default "
                        "trajectory, REJECT (trigger to exposure p99 %.0f ms)", len(unseen), p99)
        if untriggered:
            self.count.untriggered(untriggered)
            log.warning("%d decided stone(s) with no trigger edge (a beam missing stones?)", untriggered)

    def _compute(self, pair: FramePair, known: Known) -> Computed:
        """Worker thread: segment, keep the objects not seen before, crop, classify."""
        t = time.perf_counter()
        tol = self.cfg.pipeline.track_tolerance_mm
        still = self.cfg.geometry.speed_min_mm_s
        seg = segment_pair(pair.backlit.image, pair.toplit.image, self._refs["backlit"],
                           self._refs["toplit"], pair.toplit.t_ns, self._limits,
                           known=lambda seen: is_known(seen, pair.toplit.t_ns, known, tol, still),
                           t_backlit_ns=pair.backlit.t_ns)
        segment_s = time.perf_counter() - t
        new = seg.observations
        skipped = {"unpaired": seg.unpaired, "touching_border": seg.touching_border,
                   "already_decided": seg.already_decided}
        reasons = [unsortable_reason(o.size_mm, o.length_mm, o.reason, self.cfg.decision) for o in new]
        if not new:
            return Computed([], [], [], {}, segment_s, 0.0, 0.0, skipped, self.model.current())
        t = time.perf_counter()
        # Read once: this pair is cropped, classified and recorded with one release (not closed while on it).
        with self.model.using() as model:
            crop_px, input_px = self._crop_size(model)
            crops = [crop_halves(pair.backlit.image, pair.toplit.image, o, crop_px, input_px) for o in new]
            to_classify = [i for i, r in enumerate(reasons) if not r]
            preds: dict[int, Prediction] = {}
            model_s = 0.0
            if to_classify:
                out, model_s = model.predict_halves([crops[i] for i in to_classify])
                preds = dict(zip(to_classify, out, strict=True))
        return Computed(new, reasons, crops, preds, segment_s, time.perf_counter() - t, model_s, skipped, model)

    def _crop_size(self, model: Model) -> tuple[int, int]:
        """(crop px on the frame, model input px) for `model`'s manifest (a release may change them)."""
        if model.manifest is self._sized_for:
            return self._crop_px, self._input_px
        return (crop_px(model.manifest.crop_mm, self.parts.camera.pixels_per_mm),
                int(model.manifest.size[0]))

    def swap_model(self, new: Model) -> Model:
        """Put `new` live between two frame pairs (the pair being computed finishes on the old one);
        returns the old one.  Any thread; the metrics' model info follows."""
        old = self.model.swap(new)
        self.count.model(new.version, new.manifest.onnx_sha256)
        return old

    def _record_pair(self, sid: str, pair: FramePair, edges: dict[str, int | None]) -> None:
        """`run --record`: the raw pair, named after the first new stone in it."""
        times = PairTimes(pair.trigger_ns, pair.backlit.t_ns, pair.toplit.t_ns, **edges)
        self.recorder.submit_images(ImageJob(sid, None, None, raw=(pair.backlit.image, pair.toplit.image, times)))

    # -- decide, plan, fire ---------------------------------------------------

    def _stone_ids(self, pair: FramePair, n: int) -> list[str]:
        """Ids of a pair's n new stones, in segmentation order: numbered on from the last
        one; in a replay, the ids they were recorded under (`pair_stone_ids`)."""
        rec = pair.backlit.recorded
        if rec is not None:
            return pair_stone_ids(rec.name, rec.next_name, n)
        first, self._next_id = self._next_id, self._next_id + n
        return [f"S{k:06d}" for k in range(first, first + n)]

    def _decide_and_plan(self, sid: str, obs: Observation, pred: Prediction | None, reason: str,
                         model: Model) -> tuple[Routed, Pulse | None]:
        if pred is None:
            dec = safe_route(self.cfg.machine.safe_route, reason)
        else:
            m = model.manifest
            limit = m.ood.stone_limit if m.ood is not None else 1.0
            self._watch_drift(pred.ood, limit)  # this stone counts in the batch it is judged with
            dec = decide(pred.p_color, pred.p_clarity, obs.size_mm, self.cfg.decision, m.color_classes,
                         m.clarity_classes, pred.ood, limit, drifted=self.drift.alarmed)
        untimed = self._untimed(obs)
        # A stone at rest stays where it was seen (speed 0): seen again, it is the same stone.
        track = Track(sid, obs.t_ns, obs.x_mm, obs.speed_mm_s if not untimed else 0.0, obs.length_mm,
                      spread_mm=obs.length_mm if obs.cluster else 0.0, area_mm2=obs.toplit.area / self._limits.pixels_per_mm**2,
                      look=obs.look)
        self.tracker.add(track, obs.y_mm)
        if untimed:
            # No passage to predict: not planned, so no neighbour's jet is checked against it.
            self.count.untimed()
            return Routed(replace(dec, reason=f"{dec.reason}; {untimed}".lstrip("; ")), "REJECT"), None
        routed = self.neighbours.resolve(track, dec)
        route = routed.route
        pulse = plan_pulse(track, route, self.cfg.geometry, self.cfg.ejection) if route in JET_BINS else None
        return routed, pulse

    def _untimed(self, obs: Observation) -> str:
        """Why no jet can be timed for this object ('' when one can).

        A jet is timed from the stone's speed (`sorting/eject.py`); a stone slower
        than the channel's slowest (at rest: placed by hand, stopped in view) or
        whose pair measured no speed has no passage to aim at.  It keeps its decided
        bin and takes the default trajectory, REJECT, the one route that needs no
        jet (a SELECT safe route would need a timed one too); with dry-run valves
        (a replay) nothing would fire anyway, so its decision is all that counts.
        """
        if not obs.speed_known:
            return "speed unknown (the pair's exposures at one instant): no jet can be timed, default trajectory"
        slowest = self.cfg.geometry.speed_min_mm_s
        if obs.speed_mm_s < slowest:
            return (f"speed {obs.speed_mm_s:.0f} mm/s, below geometry.speed_min_mm_s = {slowest:g}: "
                    "no jet can be timed, default trajectory")
        return ""
    def _watch_drift(self, score: float | None, limit: float) -> None:
        """The batch's share of out-of-distribution stones: alarm (log, metric, summary) on drift."""
        if score is None:
            return
        alarm = self.drift.stone(score)
        if alarm is not None:
            log.warning("%s", alarm)
        self.count.ood(not score <= limit, self.drift.share(), self.drift.alarmed)

    def _dispatch(self, sid: str, pair: FramePair, obs: Observation, pred: Prediction | None,
                  routed: Routed, pulse: Pulse | None, crop: tuple[np.ndarray, np.ndarray],
                  edges: dict[str, int | None], model_version: str) -> None:
        """Send the pulse (or not), and hand the stone to the recorder (`model_version`: the
        release that classified its pair)."""
        dec = routed.decision
        row = stone_row(sid, pair, obs, pred, dec, pulse, edges, t_decided_ns=self.clock.now_ns(),
                        model_version=model_version, wall_time=wall_time_iso(), route=routed.route)
        self.count.decided_object(obs.cluster, dec.flagged)
        self._save_images(sid, pair, crop, dec.flagged)
        if self.review is not None:
            self.review.decided(sid, pred, dec, obs.size_mm, pair, crop, row.wall_time, row.model_version)
        if pulse is None:
            self._finish(row)
            return
        lead_ns = pulse.start_ns - self.clock.now_ns()
        refusal = None if lead_ns >= self.cfg.ejection.min_lead_ms * 1e6 else f"late: {lead_ns / 1e6:.2f} ms lead"
        refusal = refusal or self.parts.valves.schedule(pulse)
        if refusal:
            self._deadline_miss(row, refusal)
            return
        self.planner.pulses[sid] = pulse
        self.pending[sid] = Pending(row, pulse)
        self.valves_live.begin()
        task = asyncio.get_running_loop().create_task(self._await_outcome(sid, pulse))
        task.add_done_callback(lambda _: self.valves_live.end())  # an outcome, or abandoned
        self._outcomes.add(task)
        task.add_done_callback(self._outcomes.discard)

    async def _await_outcome(self, sid: str, pulse: Pulse) -> None:
        outcome = await self.parts.valves.outcome(pulse)
        pend = self.pending.pop(sid)
        row = pend.row
        row.valve_status = outcome.status
        row.actual_on_ns, row.actual_off_ns = outcome.actual_on_ns, outcome.actual_off_ns
        self.count.pulse_outcome(pulse.valve, outcome.status)
        if outcome.status.startswith("refused"):
            self._deadline_miss(row, outcome.status)
            return
        if outcome.status.startswith("unknown"):
            self._outcome_unknown(row)
        elif outcome.fired and outcome.actual_off_ns is not None:
            late_off_ns = outcome.actual_off_ns - pulse.end_ns
            if late_off_ns > self.cfg.ejection.margin_ms * 1e6:
                # Off edges cannot be refused.  A jet open that much longer than planned may
                # also catch the stone behind: counted, so a bin's contamination is explained.
                self.count.late_off_edge()
                log.warning("%s: valve %s closed %.1f ms late: a stone just behind may have been carried into %s",
                            sid, pulse.valve, late_off_ns / 1e6, pulse.valve, extra={"stone_id": sid, "stage": "valves"})
        self._finish(row)

    def _outcome_unknown(self, row: StoneRow) -> None:
        """The controller may or may not have fired it: the stone is in its bin or in REJECT."""
        self.count.valve_unknown()
        row.flagged = 1
        row.reason = f"{row.reason}; valve outcome unknown: in {row.route} or REJECT".lstrip("; ")

    def _deadline_miss(self, row: StoneRow, why: str) -> None:
        row.deadline_miss = 1
        row.valve_status = why
        row.route = "REJECT"
        self.count.deadline_miss()
        self.planner.pulses.pop(row.stone_id, None)
        log.warning("%s: deadline miss (%s): falls to REJECT", row.stone_id, why,
                    extra={"stone_id": row.stone_id, "stage": "eject"})
        self._finish(row)

    def _finish(self, row: StoneRow) -> None:
        """The stone's fate is sealed: count it and hand the row to the recorder.

        The row is not kept: stones.db holds it, the summary reads running counters
        (a daemon that sorts for days must not grow with every stone)."""
        self.count.finished(row.bin, row.route, row.valve_status)
        self.recorder.submit(row)
        for observe in self.row_observers:
            observe(row)
        if self.review is not None:
            self.review.finished(row.stone_id, row.route)
        self.count.queue_depth("record", self.recorder.depth)

    def _save_images(self, sid: str, pair: FramePair, crop: tuple[np.ndarray, np.ndarray], flagged: bool) -> None:
        """Queue the thumbnail (backlit | toplit crop) and, if flagged, the full frames."""
        rc = self.cfg.record
        thumb = np.hstack(crop) if rc.thumbnail_px else None  # resized by the image thread
        full = {"backlit": pair.backlit.image, "toplit": pair.toplit.image} if flagged and rc.flagged_images else None
        if thumb is not None or full:
            self.recorder.submit_images(ImageJob(sid, thumb, full))

    # -- lifecycle ------------------------------------------------------------

    def liveness(self) -> list[Liveness]:
        """The loop-owned stages the watchdog reads: capture, process (the workers), valve outcomes."""
        return [self.capture_live, self.process_live, self.valves_live]

    async def run(self) -> None:
        """Run until the trigger source ends (simulation) or stop_input() is called, and every
        stone decided has its row; or until the task is cancelled (then see abandon())."""
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("trigger", self._trigger_loop()), ("capture", self._capture_loop()), ("process", self._process_loop()))]
        self._trigger_task = tasks[0]
        if self._input_stopped:
            tasks[0].cancel()
        try:
            await asyncio.gather(*tasks)
            while self._outcomes:
                await asyncio.gather(*list(self._outcomes))
        finally:
            for t in tasks:
                t.cancel()
            self.stats.ood = self.drift.summary()  # the run summary's section, once

    def stop_input(self) -> None:
        """Take no more triggers (a stop): the edges queued, the pairs captured and the pulses
        in flight still go through, and run() returns once every decided stone has its row."""
        self._input_stopped = True
        if self._trigger_task is not None:
            self._trigger_task.cancel()

    def abandon(self) -> int:
        """The drain ran out of time: every pulse still waiting for its outcome is recorded as
        unknown (flagged: in its bin or REJECT) so that no decided stone goes without its row.
        Returns how many; cancel run() afterwards."""
        for task in list(self._outcomes):
            task.cancel()
        pending = list(self.pending.values())
        self.pending.clear()
        for pend in pending:
            pend.row.valve_status = "unknown: the run stopped before the valves reported it"
            self.count.pulse_outcome(pend.pulse.valve if pend.pulse else pend.row.bin, pend.row.valve_status)
            self._outcome_unknown(pend.row)
            self._finish(pend.row)
        return len(pending)
