"""`MachineRig` (sorterd/calibration/rig.py) on fake parts, the few-probe valve search, and calibrating a
real-machine config without an operator or a baseline."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.calibration import checklist as calibrate
from sorterd.calibration.rig import KitError, MachineRig, load_kit
from sorterd.cli import main
from sorterd.cli.compose import load_config
from sorterd.clock import WallClock
from sorterd.controller.outputs import Pulse, PulseOutcome, ValveStats
from sorterd.parts import Parts
from sorterd.parts.camera import CameraError, Frame
from sorterd.parts.lights import StrobeResult, check_pair, done
from sorterd.parts.trigger import TriggerEvent
from sorterd.sim.rig import SimRig
from sorterd.sorting.capture import SWITCH_GAP_NS
from sorterd.sorting.eject import plan_pulse

H, W = 160, 480  # 8 x 24 mm at 20 px/mm
BACK, TOP = 220, 120

REAL_TOML = """\
[machine]
name = "bench-1"
[camera]
type = "opencv"
[lights]
type = "gpio"
[trigger]
type = "beam"
[valves]
type = "gpio"
[calibration]
dir = "{dir}"
warmup_s = 0
kit = "{kit}"
"""


# -- fake parts ------------------------------------------------------------------------


class World:
    """What is in the channel: the fake camera draws it, the fake trigger starts stones."""

    def __init__(self) -> None:
        self.scene = "empty"
        self.true_ppm = 20.0  # the camera's actual scale (the config says 20)
        self.stone_x0_mm = 6.0
        self.stone_speed = 400.0
        self.stones_per_drop: list[int] = []  # e.g. [2, 1]: the first drop shows two stones
        self.stones_now = 1
        self.t_enter = 0
        self.rng = np.random.default_rng(3)


class FakeCamera:
    def __init__(self, world: World) -> None:
        self.world = world
        self.pixels_per_mm = 20.0
        self.exposure_at_strobe = True
        self.prelit = False
        self.pair_interval_ms: float | None = None
        self.lock = asyncio.Lock()
        self.grabs: list[tuple[str, int]] = []
        self.closed = False

    def reference(self, mode: str) -> np.ndarray:
        raise CameraError("no reference yet")

    async def grab(self, mode: str, t_ns: int) -> Frame:
        self.grabs.append((mode, t_ns))
        return Frame(self.render(mode, t_ns), t_ns, mode)

    def render(self, mode: str, t_ns: int) -> np.ndarray:
        w = self.world
        if w.scene == "ramp":  # frame k of a mode is uniformly base + 2k
            k = sum(m == mode for m, _ in self.grabs) - 1
            return np.full((H, W, 3), (BACK if mode == "backlit" else TOP) - 10 + 2 * k, np.uint8)
        img = np.full((H, W, 3), BACK if mode == "backlit" else TOP, np.float64)
        img += w.rng.normal(0, 2.0, img.shape)
        if w.scene == "gray" and mode == "toplit":
            img[:] = (110, 120, 130)
        if w.scene == "target" and mode == "backlit":
            cv2.circle(img, (W // 2, H // 2), int(round(4.0 * w.true_ppm / 2)), (20, 20, 20), -1)
        if w.scene == "stone":
            x_mm = w.stone_x0_mm + w.stone_speed * (t_ns - w.t_enter) / 1e9
            color = (60, 60, 60) if mode == "backlit" else (150, 60, 30)
            for i in range(w.stones_now):  # a second stone 6 mm ahead of the first
                cv2.circle(img, (int(round((x_mm + 6.0 * i) * w.true_ppm)), H // 2), int(1.5 * w.true_ppm), color, -1)
        return np.clip(img, 0, 255).astype(np.uint8)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeLights:
    lead_ns = 0
    tolerance_ns = 0

    def __init__(self) -> None:
        self.strobes: list[tuple[str, int, int]] = []
        self.off = False

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> Any:
        self.strobes.append((mode, t_on_ns, t_off_ns))
        return done(StrobeResult(mode, t_on_ns, t_off_ns, "lit"))

    def timing(self) -> dict[str, Any] | None:
        return None

    def all_off(self) -> None:
        self.off = True


class FakeTrigger:
    """A stone whenever asked (one stale, queued edge first), starting it in the world."""

    def __init__(self, world: World, clock: WallClock) -> None:
        self.world = world
        self.clock = clock
        self.stale = [TriggerEvent(1)]  # e.g. the target broke the beam long ago
        self.calls = 0
        self.references = 0  # set_reference() calls
        self.closed = False

    async def next(self) -> TriggerEvent | None:
        self.calls += 1
        await asyncio.sleep(0.001)
        if self.stale:
            return self.stale.pop()
        w = self.world
        if w.stones_per_drop:
            w.stones_now = w.stones_per_drop.pop(0)
        w.t_enter = self.clock.now_ns()
        return TriggerEvent(w.t_enter)

    def set_reference(self, backlit: np.ndarray) -> None:
        self.references += 1

    def close(self) -> None:
        self.closed = True


class FakeValves:
    def __init__(self) -> None:
        self.scheduled: list[Pulse] = []
        self.refuse: str | None = None
        self.closed = False
        self.close_order: list[str] = []

    def schedule(self, pulse: Pulse) -> str | None:
        if self.refuse:
            return self.refuse
        self.scheduled.append(pulse)
        return None

    def cancel(self, pulse: Pulse) -> bool:
        return True

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        return PulseOutcome(pulse, True, pulse.start_ns, pulse.end_ns, "fired")

    def stats(self) -> ValveStats | None:
        return None

    def close(self) -> None:
        self.closed = True


class Fakes:
    def __init__(self) -> None:
        self.clock = WallClock()
        self.world = World()
        self.camera = FakeCamera(self.world)
        self.lights = FakeLights()
        self.trigger = FakeTrigger(self.world, self.clock)
        self.valves = FakeValves()

    def parts(self) -> Parts:
        return Parts(camera=self.camera, lights=self.lights, trigger=self.trigger, valves=self.valves)


def real_cfg(tmp_path: Path, kit: str = "") -> config.Config:
    path = tmp_path / "real.toml"
    path.write_text(REAL_TOML.format(dir=tmp_path / "cal", kit=kit))
    return load_config(path)


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


def rig_on(cfg: config.Config, fakes: Fakes, answers: list[bool] | None = None,
           said: list[str] | None = None, asked: list[str] | None = None) -> MachineRig:
    queue = list(answers or [])

    def answer(q: str) -> bool:
        if asked is not None:
            asked.append(q)
        return queue.pop(0)

    return MachineRig(cfg, answer=answer, say=(said.append if said is not None else lambda s: None),
                      clock=fakes.clock, parts=fakes.parts(), stone_timeout_s=5.0)


# -- the rig's actions -------------------------------------------------------------------


def test_reference_frames_are_the_mean_of_lit_pairs_and_cached(tmp_path: Path, fakes: Fakes) -> None:
    fakes.world.scene = "ramp"
    with rig_on(real_cfg(tmp_path), fakes) as rig:
        refs = rig.reference_frames()
        assert rig.reference_frames() is refs  # cached: no second capture
        assert fakes.trigger.references == 1  # handed to the trigger once (a beam ignores it)
    # Frame k is base - 10 + 2k, k = 0..7: the mean is base - 3 everywhere.
    assert refs["backlit"].dtype == np.uint8 and refs["backlit"].shape == (H, W, 3)
    assert (refs["backlit"] == BACK - 3).all() and (refs["toplit"] == TOP - 3).all()
    grabs = fakes.camera.grabs
    assert [m for m, _ in grabs] == ["backlit", "toplit"] * 8
    strobes = fakes.lights.strobes
    assert [m for m, _, _ in strobes] == ["backlit", "toplit"] * 8
    for i in range(8):  # each pair: both lights, each covering its own exposure, all dark by t0 + 20 ms
        (_, tb), (_, tt) = grabs[2 * i], grabs[2 * i + 1]
        results = [StrobeResult(m, on, off, "lit") for m, on, off in strobes[2 * i: 2 * i + 2]]
        assert tt - tb == 10_000_000
        assert check_pair(results, tb, tt, tb + 20_000_000) is None
    # Closed: valves and the other parts, and the loop thread is gone.
    assert fakes.valves.closed and fakes.trigger.closed and fakes.camera.closed and fakes.lights.off
    assert not any(t.name == "sorterd-calibrate-rig" and t.is_alive() for t in threading.enumerate())


def test_gray_card_and_target_scale(tmp_path: Path, fakes: Fakes) -> None:
    fakes.world.true_ppm = 21.0  # the lens moved: 5 % more pixels per mm than configured
    with rig_on(real_cfg(tmp_path), fakes) as rig:
        rig.reference_frames()
        fakes.world.scene = "gray"
        gray = rig.gray_card()
        fakes.world.scene = "target"
        image, ref, diameter = rig.target()
    assert [round(float(v)) for v in calibrate.centre_mean(gray)] == [110, 120, 130]
    assert diameter == 4.0  # calibration.target_diameter_mm
    # (The contour runs through the edge pixels' centres: a crisp disc measures ~1 px small.)
    assert calibrate.target_diameter_px(image, ref) / diameter == pytest.approx(21.0, abs=0.3)


def test_warm_up_strobes_both_lights_at_the_sorting_duty_cycle(tmp_path: Path, fakes: Fakes) -> None:
    ticks: list[float] = []
    with rig_on(real_cfg(tmp_path), fakes) as rig:
        rig.warm_up(0.45, ticks.append)
    strobes = fakes.lights.strobes
    assert 8 <= len(strobes) <= 12 and [m for m, _, _ in strobes[:4]] == ["backlit", "toplit"] * 2
    (_, b_on, b_off), (_, t_on, t_off) = strobes[:2]
    # The same sequence as sorting (capture.strobe_pair): backlight off just before the ring light.
    assert (b_off - b_on, t_on - b_on, t_off - b_on) == (10_000_000 - SWITCH_GAP_NS, 10_000_000, 20_000_000)
    gaps = [strobes[i + 2][1] - strobes[i][1] for i in range(0, len(strobes) - 2, 2)]
    assert all(95e6 <= g <= 130e6 for g in gaps)  # a pair every ~100 ms
    assert ticks[0] == 0.0 and ticks[-1] == 1.0 and not fakes.camera.grabs  # lights only


def test_kit_labels_and_a_bad_line(tmp_path: Path, fakes: Fakes) -> None:
    kit = tmp_path / "kit.jsonl"
    kit.write_text('{"color": "blue", "clarity": "transparent", "stone_id": "K1"}\n\n'
                   '{"color": "inky", "clarity": "opaque"}\n{"color": "light", "clarity": "translucent"}\n')
    assert load_kit(kit) == [("blue", "transparent"), ("inky", "opaque"), ("light", "translucent")]
    said: list[str] = []
    with rig_on(real_cfg(tmp_path, str(kit)), fakes, said=said) as rig:
        rig.reference_frames()
        fakes.world.scene = "stone"
        stones = rig.reference_stones()
    assert [(c, k) for _, _, c, k in stones] == load_kit(kit)
    assert said[0] == "Feed reference stone 1/3 (blue / transparent)."
    backlit, toplit = stones[0][:2]
    assert backlit.min() < 80 and toplit[:, :, 0].max() > 140  # the stone is in both frames
    assert fakes.trigger.calls >= 4  # the stale edge was skipped

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"color": "blue", "clarity": "opaque"}\n{"color": "purple", "clarity": "opaque"}\n')
    with pytest.raises(KitError, match=rf"^{bad}:2: color = 'purple', clarity = 'opaque': allowed colors: "
                                       r"blue, light, inky; clarities: transparent, translucent, opaque$"):
        load_kit(bad)
    bad.write_text('{"color": "blue", "clarity": "opaque"}\n\n{"color": "blue" "clarity": "opaque"}\n')
    with pytest.raises(KitError, match=rf"^{bad}:3: not JSON"):
        load_kit(bad)


def test_valve_hit_shifts_the_planned_pulse_and_returns_the_operators_answer(tmp_path: Path, fakes: Fakes) -> None:
    cfg = real_cfg(tmp_path)
    asked: list[str] = []
    with rig_on(cfg, fakes, answers=[True, False, True], asked=asked) as rig:
        rig.reference_frames()
        fakes.world.scene = "stone"
        assert rig.valve_hit("CUT", 3.0, 0.0) is True
        assert rig.valve_hit("CUT", 3.0, 1.5) is False
        assert rig.valve_hit("CUT", 3.0, 5.0) is True  # later than the latency itself: still a valid probe
        p0, p1, p2 = rig.probes
    assert asked == ["Did the stone land in the CUT bin? [y/n]"] * 3
    assert fakes.valves.scheduled == [p0.pulse, p1.pulse, p2.pulse]
    assert p0.track is not None and p1.track is not None
    assert p0.track.speed_mm_s == pytest.approx(400.0, abs=10) and 9.5 < p0.track.x_mm < 12.0
    ej = replace(cfg.ejection, opening_latency_ms={**cfg.ejection.opening_latency_ms, "CUT": 3.0})
    planned0 = plan_pulse(p0.track, "CUT", cfg.geometry, ej)
    planned1 = plan_pulse(p1.track, "CUT", cfg.geometry, ej)
    assert p0.pulse == planned0
    # Offset +1.5 ms: the same plan, fired 1.5 ms later (SimRig's convention: hit window centre = latency error).
    assert p1.pulse is not None
    assert p1.pulse.start_ns - planned1.start_ns == pytest.approx(1_500_000, abs=1)
    assert p1.pulse.end_ns - planned1.end_ns == pytest.approx(1_500_000, abs=1)
    assert p2.track is not None and p2.pulse is not None
    assert p2.pulse.start_ns - plan_pulse(p2.track, "CUT", cfg.geometry, ej).start_ns == 5_000_000


def test_valve_hit_needs_exactly_one_stone_and_a_fired_pulse(tmp_path: Path, fakes: Fakes) -> None:
    said: list[str] = []
    asked: list[str] = []
    with rig_on(real_cfg(tmp_path), fakes, answers=[True], said=said, asked=asked) as rig:
        rig.reference_frames()
        fakes.world.scene = "stone"
        fakes.world.stones_per_drop = [2, 1]  # two stones at once, then one
        assert rig.valve_hit("SELECT", 3.0, 0.0) is True
        assert [p.result for p in rig.probes] == ["saw 2 stones in view, not one", "hit"]
        assert any("drop one test stone again" in s for s in said)
        fakes.valves.refuse = "refused: controller not ready (sync)"
        assert rig.valve_hit("SELECT", 3.0, 0.0) is False  # counted as a miss, nobody asked
        assert rig.probes[-1].result == "refused: controller not ready (sync)"
    assert len(asked) == 1 and len(fakes.valves.scheduled) == 1


def test_vision_trigger_waits_for_todays_reference_then_watches_it(tmp_path: Path, fakes: Fakes) -> None:
    from sorterd.parts.trigger.vision import VisionTrigger

    (tmp_path / "real.toml").write_text(REAL_TOML.format(dir=tmp_path / "cal", kit="").replace(
        'type = "beam"', 'type = "vision"'))
    cfg = load_config(tmp_path / "real.toml")

    def no_reference(mode: str) -> Any:
        raise CameraError("no reference frame yet")

    fakes.camera.reference = no_reference  # a real camera before today's calibration: none yet
    # The real vision trigger on the fake camera, as sorterd.cli.compose opens it.
    fakes.trigger = VisionTrigger(cfg.trigger, fakes.camera, fakes.lights, fakes.clock)  # type: ignore[assignment]
    with rig_on(cfg, fakes) as rig:
        trigger = rig.parts.trigger
        assert isinstance(trigger, VisionTrigger) and trigger._ref is None
        refs = rig.reference_frames()
        assert trigger._ref is not None
        assert trigger.x0 == round(cfg.trigger.zone_from_mm * cfg.camera.pixels_per_mm)
        assert trigger.occupied_px(refs["backlit"]) == 0  # today's empty channel is "nothing there"


# -- the valve search --------------------------------------------------------------------


class WindowRig:
    """valve_hit is True exactly inside a known window per valve."""

    needs_operator = False
    instant_warmup = True

    def __init__(self, windows: dict[str, tuple[float, float]]) -> None:
        self.windows = windows
        self.calls: dict[str, list[float]] = {b: [] for b in windows}

    def valve_hit(self, bin_name: str, latency_ms: float, offset_ms: float) -> bool:
        self.calls[bin_name].append(offset_ms)
        a, b = self.windows[bin_name]
        return a <= offset_ms <= b


def test_bracketing_finds_the_window_with_few_probes(sim_cfg: config.Config) -> None:
    windows = {"CUT": (-3.75, 1.25), "SELECT": (-7.5, -2.0), "FLIP": (-1.0, 1.0)}
    rig = WindowRig(windows)
    checklist = calibrate.Checklist(sim_cfg, rig, io.StringIO(), ask=lambda s: None)  # type: ignore[arg-type]
    latency = checklist.valves()
    steps = {r.name: r for r in checklist.results}
    for b, (lo, hi) in windows.items():
        m = steps[f"valve {b}"].measured
        assert m["hit_window_ms"] == [lo, hi]
        assert latency[b] == pytest.approx(3.0 - (lo + hi) / 2)
        calls = rig.calls[b]
        assert m["probes"] == len(calls) == len(set(calls)) <= 14  # the sweep: 65
        assert all(abs(o) <= 8 and (o / 0.25).is_integer() for o in calls)
        assert calls[0] == 0.0
    assert rig.calls["SELECT"][:3] == [0.0, 2.0, -2.0]  # coarse steps until one hits


def test_bracketing_equals_the_sweep_on_every_window_a_coarse_probe_can_find() -> None:
    grid = [k * 0.25 for k in range(-32, 33)]
    checked = 0
    for i, a in enumerate(grid):
        for b in grid[i:]:
            if not any(a <= c <= b for c in (0, 2, -2, 4, -4, 6, -6, 8, -8)):
                continue
            rig = WindowRig({"CUT": (a, b)})
            window, n = calibrate.find_hit_window(functools.partial(rig.valve_hit, "CUT", 3.0))
            assert window == (a, b) and n == len(rig.calls["CUT"]) <= 20
            checked += 1
    assert checked > 1500
    assert calibrate.find_hit_window(lambda o: False) == (None, 9)


def test_bracketing_gives_the_sweeps_latency_on_the_simulated_slow_valve() -> None:
    cfg = load_config(config.sim_config_path(), {"sim": {"faults": {"cut_valve_slow_ms": 3.0}}})
    rig = SimRig(cfg)
    sweep = [k * 0.25 for k in range(-32, 33) if rig.valve_hit("CUT", 3.0, k * 0.25)]
    window, probes = calibrate.find_hit_window(lambda o: rig.valve_hit("CUT", 3.0, o))
    assert window == (sweep[0], sweep[-1]) == (-7.25, 1.25)
    assert 3.0 - sum(window) / 2 == pytest.approx(6.0)
    assert probes == 12  # was 65


# -- baseline, --yes, --set-baseline -------------------------------------------------------


def test_missing_baseline_warns_and_a_stored_one_is_used(tmp_path: Path, fakes: Fakes) -> None:
    cfg = real_cfg(tmp_path)
    with rig_on(cfg, fakes) as rig:
        assert rig.baseline() is None
        refs = rig.reference_frames()
        checklist = calibrate.Checklist(cfg, rig, io.StringIO(), ask=None)
        checklist.backlight(refs["backlit"], None)
        fakes.world.scene = "gray"
        checklist.white_balance(None)
        base = calibrate.Baseline(float(calibrate.centre_mean(refs["backlit"]).mean()), [110.0, 120.0, 130.0], 20.0)
        calibrate.save_baseline(Path(cfg.calibration.dir), cfg.machine.name, base)
        assert rig.baseline() == base
        checklist.backlight(refs["backlit"], rig.baseline())
    back, wb, back2 = checklist.results
    assert (back.status, wb.status) == ("warn", "warn")
    assert back.message == wb.message == "no baseline yet: run `sorterd calibrate --set-baseline` on a healthy machine"
    assert back2.status == "pass" and back2.measured["drift"] == pytest.approx(0.0, abs=1e-3)
    assert json.loads((tmp_path / "cal" / "bench-1" / "baseline.json").read_text())["gray_bgr"] == [110.0, 120.0, 130.0]


def test_yes_on_a_real_machine_skips_operator_steps_and_does_not_pass(
        tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real_cfg(tmp_path)  # writes real.toml
    opened: list[Any] = []

    def fake_open_parts(cfg: config.Config, clock: Any) -> Parts:
        opened.append(cfg)
        return fakes.parts()

    monkeypatch.setattr("sorterd.cli.compose.open_parts", fake_open_parts)
    code = main(["calibrate", "--config", str(tmp_path / "real.toml"), "--yes", "--warmup-s", "0", "--set-baseline"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1 and len(opened) == 1 and fakes.valves.closed
    assert "[WARN] backlight: no baseline yet" in out
    for step in ("white balance", "scale", "reference stones", "valve CUT", "valve SELECT", "valve FLIP"):
        assert f"[skip] {step}: needs an operator" in out
    assert "calibration FAILED (1 warnings, 6 required steps skipped)" in out
    assert "--set-baseline: not stored" in captured.err
    assert not (tmp_path / "cal" / "bench-1" / "baseline.json").exists()
    [path] = (tmp_path / "cal" / "bench-1").glob("*/profile.json")
    profile = calibrate.Profile.load(path)
    assert not profile.passed and {s.status for s in profile.steps} == {"skip", "pass", "warn"}
    assert not fakes.valves.scheduled  # no pulse without a person watching


def test_set_baseline_stores_a_passing_sessions_measurements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--sim", "--yes", "--warmup-s", "0", "--set-baseline"]) == 0
    base = calibrate.load_baseline(Path("calibration"), "sim-1")
    assert base is not None and "baseline written to" in capsys.readouterr().out
    assert base.backlight_intensity == pytest.approx(225.0, abs=2.0)
    assert base.pixels_per_mm == 20.0 and len(base.gray_bgr) == 3
    assert math.isclose(base.gray_bgr[1], 118.0, abs_tol=5.0)
