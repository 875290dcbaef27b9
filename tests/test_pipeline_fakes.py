"""The pipeline end to end on small fakes: no simulator, a few stones, a known answer for each.

The fakes are the parts' contracts and nothing more: a trigger that fires when a stone's front
crosses the beam, a camera that draws discs on a reference, lights and valves that do what they
are told, and a model whose answer is read from the stone's colour in the toplit crop.  Every
figure can then be checked exactly: the bin, the route and the jet times of each stone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.clock import Clock, VirtualClock
from sorterd.controller.outputs import Pulse, PulseOutcome
from sorterd.data.bundle import OodSpec
from sorterd.metrics import Metrics
from sorterd.parts import Parts
from sorterd.parts.camera import Frame
from sorterd.parts.inference import Prediction
from sorterd.parts.lights import StrobeResult, done
from sorterd.parts.trigger import TriggerEvent
from sorterd.sorting.eject import plan_pulse
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder, read_rows
from sorterd.sorting.stats import RunStats
from sorterd.sorting.track import Track

PPM = 20.0  # pixels per mm
W, H = 640, 240  # a 32 x 12 mm view
BEAM_MM = 10.0  # the sim config's trigger.beam_x_mm: the ledger expects edges there
# The virtual clock is wall time plus skipped idle time, so a capture comes as late as the loop
# is slow to run it: on a loaded machine (2 cores, several test runs) 10-20 ms.  Each stone must
# still be decided in its own trigger's capture, so the spacing leaves the same margin both ways:
# the next stone is fully in view only 26 ms late (6.5 mm), the stone ahead leaves it only 32 ms
# late (8 mm); at 400 mm/s and 12 mm apart that was 9 ms for the one and 25 ms for the other.
SPEED = 250.0  # mm/s
SPACING_MM = 14.0  # centre to centre of consecutive stones on the channel
GAP_NS = int(SPACING_MM / SPEED * 1e9)  # between trigger edges: the stone ahead is still in view at the next capture
BACK_BG, TOP_BG = 200, 20  # the empty channel on the backlight / under the ring light
BACK_STONE = 60
# The toplit colour of a stone says what the fake model answers for it.
BLUE_CLEAR, INKY_OPAQUE, LIGHT_TRANSLUCENT = 180, 110, 140


@dataclass(frozen=True)
class Stone:
    """A stone as the fakes know it: discs (one, or two touching for a cluster) on a line."""

    edge_ns: int  # its front crosses the beam
    size_mm: float
    y_mm: float
    top: int  # its toplit colour (the model's answer)
    twin_mm: float = 0.0  # > 0: a second disc that far behind, touching it (a cluster)

    def centres_mm(self, t_ns: int) -> list[float]:
        front = BEAM_MM + SPEED * (t_ns - self.edge_ns) * 1e-9
        first = front - self.size_mm / 2.0
        return [first] + ([first - self.twin_mm] if self.twin_mm else [])


@dataclass
class FakeCamera:
    """A camera whose frames are exposed at the instants asked for (made inside the running loop)."""

    stones: Sequence[Stone]
    clock: Clock
    pixels_per_mm: float = PPM
    prelit: bool = False  # the lights strobe its frames
    exposure_at_strobe: bool = True  # its timestamps are the exposure instants
    pair_interval_ms: float | None = None  # the lights' setting
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    grabs: list[tuple[str, int]] = field(default_factory=list)

    def reference(self, mode: str) -> np.ndarray:
        return np.full((H, W, 3), BACK_BG if mode == "backlit" else TOP_BG, np.uint8)

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)  # the exposure is at t_ns, not before
        self.grabs.append((mode, t_ns))
        img = self.reference(mode)
        for s in self.stones:
            colour = BACK_STONE if mode == "backlit" else s.top
            for cx in s.centres_mm(t_ns):
                cv2.circle(img, (round(cx * PPM * 16), round(s.y_mm * PPM * 16)), round(s.size_mm / 2 * PPM * 16),
                           (colour, colour, colour), -1, cv2.LINE_AA, shift=4)
        return Frame(img, t_ns, mode)

    def reopen(self) -> None:
        raise AssertionError("the fake camera is never lost")

    def close(self) -> None:
        pass


@dataclass
class FakeLights:
    lead_ns: int = 0
    tolerance_ns: int = 0
    strobes: list[tuple[str, int, int]] = field(default_factory=list)

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> Awaitable[StrobeResult]:
        self.strobes.append((mode, t_on_ns, t_off_ns))
        return done(StrobeResult(mode, t_on_ns, t_off_ns, "lit"))

    def timing(self) -> dict[str, Any] | None:
        return None  # not measured

    def all_off(self) -> None:
        pass


@dataclass
class FakeTrigger:
    edges_ns: Sequence[int]
    clock: Clock
    _next: int = 0

    async def next(self) -> TriggerEvent | None:
        if self._next == len(self.edges_ns):
            return None
        t = self.edges_ns[self._next]
        self._next += 1
        await self.clock.sleep_until(t)
        return TriggerEvent(t)

    def set_reference(self, backlit: np.ndarray) -> None:
        pass  # it does not look

    def close(self) -> None:
        pass


@dataclass
class FakeValves:
    """Hardware-timed valves: a pulse fires exactly as planned, its outcome at its end."""

    clock: Clock
    scheduled: list[Pulse] = field(default_factory=list)

    def schedule(self, pulse: Pulse) -> str | None:
        self.scheduled.append(pulse)
        return None

    def cancel(self, pulse: Pulse) -> bool:
        raise AssertionError(f"no neighbours are this close: {pulse} was never to be cancelled")

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        await self.clock.sleep_until(pulse.end_ns)
        return PulseOutcome(pulse, True, pulse.start_ns, pulse.end_ns, "fired")

    def stats(self) -> None:
        return None  # not measured

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FakeManifest:
    size: tuple[int, int] = (64, 64)
    crop_mm: float = 4.0
    onnx_sha256: str = "f" * 64
    color_classes: tuple[str, ...] = ("blue", "light", "inky")
    clarity_classes: tuple[str, ...] = ("transparent", "translucent", "opaque")
    ood: OodSpec | None = None  # no out-of-distribution gate, as an older bundle


class FakeModel:
    """Answers from the toplit crop's centre colour: the fakes' stones carry their class."""

    version = "fake-1"
    manifest = FakeManifest()
    ANSWERS = {BLUE_CLEAR: ((0.95, 0.03, 0.02), (0.96, 0.03, 0.01)),
               INKY_OPAQUE: ((0.02, 0.03, 0.95), (0.02, 0.03, 0.95)),
               LIGHT_TRANSLUCENT: ((0.1, 0.7, 0.2), (0.1, 0.85, 0.05))}

    def __init__(self) -> None:
        self.seen: list[int] = []

    def predict_halves(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        out = []
        for _, top in crops:
            h, w = top.shape[:2]
            value = int(top[h // 2, w // 2, 0])
            self.seen.append(value)
            colour, clarity = self.ANSWERS[min(self.ANSWERS, key=lambda v: abs(v - value))]
            out.append(Prediction(np.array(colour), np.array(clarity)))
        return out, 0.001


START_NS = 50_000_000  # after the run starts, the first edge
STONES = [  # (what it is, what must become of it)
    (Stone(START_NS, 2.5, 6.0, BLUE_CLEAR), "CUT"),
    (Stone(START_NS + GAP_NS, 1.6, 5.0, BLUE_CLEAR), "SELECT"),  # CUT's class, below cut_min_size_mm
    (Stone(START_NS + 2 * GAP_NS, 2.5, 7.0, INKY_OPAQUE), "REJECT"),  # no jet: the default trajectory
    (Stone(START_NS + 3 * GAP_NS, 2.2, 6.0, LIGHT_TRANSLUCENT), "FLIP"),  # confidence 0.7: flagged
    (Stone(START_NS + 4 * GAP_NS, 2.0, 6.0, BLUE_CLEAR, twin_mm=1.8), "REJECT"),  # two touching: a cluster
]


@dataclass
class Ran:
    stats: RunStats
    rows: list[dict[str, Any]]
    metrics: Metrics
    parts: Parts
    model: FakeModel
    t0_ns: int


def run_fakes(tmp_path: Path, cfg: config.Config, model_cls: type[FakeModel] | None = None) -> Ran:
    """Drive one Pipeline over STONES on a virtual clock; the rows as the recorder wrote them."""
    clock = VirtualClock()
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))

    async def main() -> Ran:
        t0 = clock.now_ns()
        stones = [Stone(t0 + s.edge_ns, s.size_mm, s.y_mm, s.top, s.twin_mm) for s, _ in STONES]
        parts = Parts(camera=FakeCamera(stones, clock), lights=FakeLights(),
                      trigger=FakeTrigger([s.edge_ns for s in stones], clock), valves=FakeValves(clock))
        recorder = Recorder(tmp_path, 0.01, 100, cfg.record.thumbnail_px)
        metrics = Metrics()
        model = (model_cls or FakeModel)()
        pipeline = Pipeline(cfg, clock, parts, model, recorder, metrics)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(pipeline.run(), 30.0)
        finally:
            recorder.close()
        return Ran(pipeline.stats, read_rows(recorder.db_path), metrics, parts, model, t0)

    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ran, config.Config]:
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False}})
    return run_fakes(tmp_path_factory.mktemp("batch"), cfg), cfg


def test_each_stone_is_decided_once_into_its_bin(ran: tuple[Ran, config.Config]) -> None:
    r, _ = ran
    got = [(row["stone_id"], row["bin"], row["route"], row["valve_status"]) for row in r.rows]
    assert got == [("S000001", "CUT", "CUT", "fired"), ("S000002", "SELECT", "SELECT", "fired"),
                   ("S000003", "REJECT", "REJECT", "no pulse"), ("S000004", "FLIP", "FLIP", "fired"),
                   ("S000005", "REJECT", "REJECT", "no pulse")]
    # Each stone is in view for two captures: the second time the tracker knows it.
    assert r.stats.captures == 5 and r.stats.objects == 5
    assert [row["capture_seq"] for row in r.rows] == [0, 1, 2, 3, 4]


def test_the_model_answers_each_stone_and_a_cluster_is_not_classified(ran: tuple[Ran, config.Config]) -> None:
    r, _ = ran
    classes = [(row["color"], row["clarity"], row["flagged"], row["reason"]) for row in r.rows[:4]]
    assert classes == [("blue", "transparent", 0, "sorted"), ("blue", "transparent", 0, "sorted"),
                       ("inky", "opaque", 0, "sorted"), ("light", "translucent", 1, "review")]
    assert [row["p_blue"] for row in r.rows[:4]] == [0.95, 0.95, 0.02, 0.1]
    cluster = r.rows[4]
    assert cluster["cluster"] == 1 and cluster["reason"].startswith("cluster")
    assert [cluster[k] for k in ("p_blue", "p_light", "p_inky", "p_transparent", "p_translucent", "p_opaque",
                                 "color", "clarity")] == [None] * 8
    assert len(r.model.seen) == 4  # the cluster never reached the model


def test_measurements_and_jet_times_follow_the_stones(ran: tuple[Ran, config.Config]) -> None:
    """The planned pulse is the one for the true stone's passage (within a pixel's worth)."""
    r, cfg = ran
    for (stone, _), row in zip(STONES[:4], r.rows, strict=False):
        assert row["size_mm"] == pytest.approx(stone.size_mm, abs=0.15)  # a contour is a pixel wider
        assert row["speed_mm_s"] == pytest.approx(SPEED, rel=0.01)
        assert row["y_mm"] == pytest.approx(stone.y_mm, abs=0.05)
        assert row["t_trigger_ns"] == r.t0_ns + stone.edge_ns
        assert row["t_toplit_ns"] - row["t_backlit_ns"] == cfg.lights.pair_interval_ms * 1e6
        if row["planned_on_ns"] is None:
            continue
        edge = r.t0_ns + stone.edge_ns
        truth = Track(row["stone_id"], edge, BEAM_MM - stone.size_mm / 2, SPEED, stone.size_mm)
        want = plan_pulse(truth, row["bin"], cfg.geometry, cfg.ejection)
        assert abs(row["planned_on_ns"] - want.start_ns) < 300_000, row["stone_id"]
        assert abs(row["planned_off_ns"] - want.end_ns) < 300_000, row["stone_id"]
        assert (row["actual_on_ns"], row["actual_off_ns"]) == (row["planned_on_ns"], row["planned_off_ns"])
    assert [p.stone_id for p in r.parts.valves.scheduled] == ["S000001", "S000002", "S000004"]  # type: ignore[attr-defined]


def test_the_lights_edges_are_recorded_with_each_stone(ran: tuple[Ran, config.Config]) -> None:
    r, _ = ran
    for row in r.rows:
        assert row["backlit_on_ns"] == row["t_backlit_ns"] and row["toplit_on_ns"] == row["t_toplit_ns"]
        assert row["backlit_off_ns"] < row["toplit_on_ns"] < row["toplit_off_ns"]


def test_every_edge_is_accounted_for_and_every_figure_agrees(ran: tuple[Ran, config.Config]) -> None:
    r, _ = ran
    s = r.stats
    assert (s.passed_unseen, s.untriggered, s.triggers_dropped, s.pairs_dropped) == (0, 0, 0, 0)
    assert (s.deadline_misses, s.conflicts, s.co_deflection_risks, s.lighting_faults) == (0, 0, {}, 0)
    assert (s.clusters, s.flagged) == (1, 1)
    assert s.decided == {"CUT": 1, "SELECT": 1, "FLIP": 1, "REJECT": 2}
    m = r.metrics.registry
    assert {b: m.get_sample_value("sorterd_stones_total", {"bin": b}) for b in s.decided} == s.decided
    assert m.get_sample_value("sorterd_captures_total") == 5
    assert m.get_sample_value("sorterd_clusters_total") == m.get_sample_value("sorterd_flagged_total") == 1
    for valve in ("CUT", "SELECT", "FLIP"):
        assert m.get_sample_value("sorterd_pulses_total", {"valve": valve, "status": "fired"}) == 1
    assert len(s.latency_s["segment"]) == len(s.latency_s["infer"]) == 4  # the classified ones
    assert len(s.latency_s["exposure_to_pulse"]) == len(s.latency_s["trigger_to_exposure"]) == 5
    assert m.get_sample_value("sorterd_stage_seconds_count", {"stage": "model_only"}) == 4


class GatedModel(FakeModel):
    """A bundle with the out-of-distribution gate that finds the blue stones foreign."""

    manifest = FakeManifest(ood=OodSpec("ood_score", 1.0, 0.10, 2))

    def predict_halves(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        preds, s = super().predict_halves(crops)
        return [Prediction(p.p_color, p.p_clarity, 3.0 if p.p_color[0] > 0.9 else 0.2) for p in preds], s


def test_a_stone_the_model_does_not_know_goes_to_select_and_the_batch_alarms(tmp_path: Path) -> None:
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False}})
    r = run_fakes(tmp_path, cfg, GatedModel)
    got = [(row["bin"], row["flagged"], row["reason"].split(":")[0]) for row in r.rows[:4]]
    assert got == [("SELECT", 1, "out of distribution"), ("SELECT", 1, "out of distribution"),
                   ("REJECT", 0, "sorted"), ("FLIP", 1, "review")]
    ood = r.stats.ood
    assert ood["gate"] and ood["stones_scored"] == 4 and ood["over_limit"] == 2 and ood["alarms"] == 1
    assert ood["alarm"].startswith("the model does not know this machine/lot")
    assert r.metrics.registry.get_sample_value("sorterd_ood_stones_total") == 2.0


class DriftingModel(FakeModel):
    """Gated; the first OUT stones are far outside, every later one just inside the limit; the
    fourth stone is a sure CUT stone (blue transparent)."""

    manifest = FakeManifest(ood=OodSpec("ood_score", 1.0, 0.10, 2))
    OUT = 2

    def predict_halves(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        preds, s = super().predict_halves(crops)
        first = len(self.seen) - len(preds)
        sure = np.array([0.98, 0.01, 0.01])
        return [Prediction(sure if first + i == 3 else p.p_color, sure if first + i == 3 else p.p_clarity,
                           3.0 if first + i < self.OUT else 0.9) for i, p in enumerate(preds)], s


class CalmModel(DriftingModel):
    OUT = 0


def test_a_drifted_batch_holds_the_cut_stone_the_calm_run_sorts(tmp_path: Path) -> None:
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False}})
    for name in ("calm", "drift", "off"):
        (tmp_path / name).mkdir()
    calm = run_fakes(tmp_path / "calm", cfg, CalmModel)
    cut = [row["stone_id"] for row in calm.rows if row["bin"] == "CUT" and row["reason"] == "sorted"]
    assert len(cut) == 2 and calm.stats.ood["alarms"] == 0  # the stream's own CUT stone and the fourth
    r = run_fakes(tmp_path / "drift", cfg, DriftingModel)
    held = {row["stone_id"]: row for row in r.rows if row["stone_id"] in cut}
    late = held[cut[-1]]  # judged after the two foreign stones raised the alarm
    assert (late["bin"], late["flagged"]) == ("SELECT", 1) and late["reason"].startswith("batch drifted: CUT held")
    assert r.stats.ood["alarms"] == 1
    # The same stones with the hold off: the alarm still sounds, the stone goes to CUT.
    off = load_config(config.sim_config_path(), {"metrics": {"enabled": False}, "decision": {"on_drift": "alarm-only"}})
    r2 = run_fakes(tmp_path / "off", off, DriftingModel)
    assert {row["stone_id"]: row["bin"] for row in r2.rows}[cut[-1]] == "CUT" and r2.stats.ood["alarms"] == 1


def test_a_model_without_the_gate_says_so_in_the_summary(ran: tuple[Ran, config.Config]) -> None:
    r, _ = ran
    assert r.stats.ood["gate"] is False and "no out-of-distribution gate" in r.stats.ood["note"]
