"""The `vision` trigger: previews of the entry zone against the reference."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run
from sorterd.parts.camera import CameraError, Frame
from sorterd.parts.trigger.vision import VisionTrigger, VisionTriggerConfig
from sorterd.sim.parts.lights import SimLights, SimLightsConfig

PPM = 20.0
W, H = 640, 120
GRAY = 200  # the lit backlight panel


class MovingStones:
    """A backlit channel with dark discs moving right: (t_enter_ns at x=0, speed mm/s, diameter mm)."""

    pixels_per_mm = PPM
    prelit = False
    exposure_at_strobe = True
    pair_interval_ms = None

    def __init__(self, clock: Any, stones: list[tuple[int, float, float]], down: tuple[int, int] | None = None,
                 noise: float = 2.0) -> None:
        self.clock = clock
        self.stones = stones
        self.down = down  # camera unplugged over [a, b) ns
        self.rng = np.random.default_rng(0)
        self.noise = noise
        self.reopens = 0
        self.lock = asyncio.Lock()

    def reference(self, mode: str) -> np.ndarray:
        return np.full((H, W, 3), GRAY, np.uint8)

    def _gone(self) -> bool:
        return self.down is not None and self.down[0] <= self.clock.now_ns() < self.down[1]

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        if self._gone():
            raise CameraError("unplugged")
        img = np.full((H, W, 3), GRAY, np.float32)
        for t_in, speed, d in self.stones:
            x_mm = (t_ns - t_in) / 1e9 * speed - d / 2
            cv2.circle(img, (int(x_mm * PPM), H // 2), int(d / 2 * PPM), (40, 60, 90), -1)
        img += self.rng.normal(0, self.noise, img.shape)
        return Frame(np.clip(img, 0, 255).astype(np.uint8), t_ns, mode)

    def reopen(self) -> None:
        if self._gone():
            raise CameraError("still unplugged")
        self.reopens += 1


class StepClock:
    """Discrete-event time: it moves only when someone sleeps (deterministic whatever the machine's load)."""

    virtual = True

    def __init__(self) -> None:
        self.t = 1_000_000_000

    def now_ns(self) -> int:
        return self.t

    async def sleep_until(self, t_ns: int) -> None:
        self.t = max(self.t, t_ns)
        await asyncio.sleep(0)


def triggers(cam_stones: list[tuple[int, float, float]], until_ns: int, down: tuple[int, int] | None = None,
             **cfg: Any) -> tuple[list[int], VisionTrigger]:
    clock = StepClock()
    base = clock.now_ns()  # times in the test are from here

    async def main() -> tuple[list[int], VisionTrigger]:
        cam = MovingStones(clock, [(base + t, v, d) for t, v, d in cam_stones],
                           None if down is None else (base + down[0], base + down[1]))
        trig = VisionTrigger(VisionTriggerConfig(**cfg), cam, SimLights(SimLightsConfig()),
                             clock,  # type: ignore[arg-type]
                             stop_at=lambda: base + until_ns, max_speed_mm_s=1000.0)
        out = []
        while (ev := await trig.next()) is not None:
            out.append(ev.t_ns - base)
        return out, trig

    return asyncio.run(main())


MS = 1_000_000


def test_one_trigger_per_stone_at_its_entry() -> None:
    # Three stones at 400 mm/s, 80 ms apart: each enters the zone (6-14 mm) at t_in + 15 ms or so.
    stones = [(i * 80 * MS, 400.0, 2.0) for i in range(3)]
    ts, trig = triggers(stones, 300 * MS)
    assert len(ts) == 3
    for (t_in, speed, _d), t in zip(stones, ts, strict=True):
        front_mm = (t - t_in) / 1e9 * speed
        assert 6.0 <= front_mm <= 6.0 + 0.4 + speed * 5e-3 + 1e-6  # seen within one preview (5 ms) of entering
    assert trig.previews >= 55


class BusyCamera(MovingStones):
    """A pair holds the camera over [busy_from, busy_to): a preview asked for meanwhile is exposed at its end."""

    def __init__(self, clock: Any, stones: list[tuple[int, float, float]], busy: tuple[int, int]) -> None:
        super().__init__(clock, stones)
        self.busy = busy

    async def grab(self, mode: str, t_ns: int) -> Frame:
        return await super().grab(mode, self.busy[1] if self.busy[0] <= t_ns < self.busy[1] else t_ns)


def test_an_edge_seen_late_says_how_early_the_stone_may_have_crossed() -> None:
    """A stone whose front crosses the zone's start (6 mm) at +20 ms while a pair holds the camera
    until +40 ms is seen only then, 20 ms late (more than the trigger's slack).  The event says
    it crossed after the last preview before: the ledger can still match its decision."""
    clock = StepClock()
    base = clock.now_ns()

    async def main() -> list[Any]:
        speed = 200.0
        t_in = 20 * MS - int(6.0 / speed * 1e9)  # front at 6 mm at +20 ms
        cam = BusyCamera(clock, [(base + t_in, speed, 2.0)], (base + 8 * MS, base + 40 * MS))
        cfg = VisionTriggerConfig()
        trig = VisionTrigger(cfg, cam, SimLights(SimLightsConfig()), clock,  # type: ignore[arg-type]
                             stop_at=lambda: base + 100 * MS, max_speed_mm_s=1000.0)
        assert cfg.slack_ns < 20 * MS
        return [ev async for ev in _events(trig)]

    (ev,) = asyncio.run(main())
    crossing = base + 20 * MS
    assert ev.t_ns - crossing > 15 * MS  # seen late
    assert ev.earliest_ns is not None and ev.earliest_ns <= crossing <= ev.t_ns


def test_stones_that_entered_while_the_camera_was_busy_each_get_an_edge() -> None:
    """Two stones 4 mm apart both enter the zone while a pair holds the camera: the one
    preview after it sees two new fronts, and gives two edges, not one."""
    clock = StepClock()
    base = clock.now_ns()

    async def main() -> list[Any]:
        speed = 200.0
        first = 25 * MS - int(6.0 / speed * 1e9)  # crosses 6 mm at +25 ms, the other at +45 ms
        cam = BusyCamera(clock, [(base + first, speed, 2.0), (base + first + 20 * MS, speed, 2.0)],
                         (base + 8 * MS, base + 50 * MS))
        trig = VisionTrigger(VisionTriggerConfig(), cam, SimLights(SimLightsConfig()), clock,  # type: ignore[arg-type]
                             stop_at=lambda: base + 100 * MS, max_speed_mm_s=1000.0)
        return [ev async for ev in _events(trig)]

    evs = asyncio.run(main())
    assert len(evs) == 2 and evs[0] == evs[1]
    assert all(e.earliest_ns is not None and e.earliest_ns <= base + 25 * MS for e in evs)


class FlickerAfterBusy(BusyCamera):
    """... and in the first preview after the pair, the stone is below the threshold (flicker)."""

    async def grab(self, mode: str, t_ns: int) -> Frame:
        if self.busy[0] <= t_ns < self.busy[1]:  # the preview that waited for the pair
            await self.clock.sleep_until(self.busy[1])
            return Frame(self.reference(mode), self.busy[1], mode)
        return await super().grab(mode, t_ns)


def test_a_stone_missed_in_the_first_preview_after_a_pair_does_not_trigger_again() -> None:
    """clear_frames counts previews: a pair that kept the camera 22 ms (over four periods) must
    not make a flickering front forgotten at the first preview after it, and a second edge."""
    clock = StepClock()
    base = clock.now_ns()

    async def main() -> list[Any]:
        speed = 100.0  # 80 ms in the zone
        cam = FlickerAfterBusy(clock, [(base + 2 * MS - int(6.0 / speed * 1e9), speed, 2.0)],
                               (base + 8 * MS, base + 30 * MS))
        trig = VisionTrigger(VisionTriggerConfig(clear_frames=2), cam, SimLights(SimLightsConfig()),
                             clock,  # type: ignore[arg-type]
                             stop_at=lambda: base + 70 * MS, max_speed_mm_s=1000.0)
        return [ev async for ev in _events(trig)]

    assert len(asyncio.run(main())) == 1


def test_two_edges_of_one_preview_are_explained_by_two_stones() -> None:
    from sorterd.sorting.ledger import TriggerLedger

    lg = TriggerLedger(tolerance_ns=12 * MS, horizon_ns=1000 * MS)
    for _ in range(2):
        lg.edge(150 * MS, earliest_ns=105 * MS)
    lg.decided(110 * MS)
    lg.decided(130 * MS)
    assert lg.close() == [] and lg.counts.untriggered == 0


async def _events(trig: VisionTrigger) -> Any:
    while (ev := await trig.next()) is not None:
        yield ev


def test_close_stones_in_the_zone_together_each_trigger() -> None:
    """Closer than the zone is long: the zone never empties between them."""
    stones = [(0, 400.0, 1.5), (10 * MS, 400.0, 1.5), (22 * MS, 400.0, 2.5)]  # 4 mm and 4.8 mm apart
    ts, _ = triggers(stones, 150 * MS)
    assert len(ts) == 3


def test_slow_stone_lingering_in_the_zone_is_one_trigger_and_dust_none() -> None:
    ts, _ = triggers([(0, 50.0, 3.0)], 400 * MS)  # 50 mm/s: ~200 ms inside the zone
    assert len(ts) == 1
    ts, _ = triggers([(0, 400.0, 0.3)], 150 * MS)  # 0.07 mm2: below min_area_mm2
    assert ts == []


def test_camera_lost_during_previews_is_reopened_and_previews_resume() -> None:
    # Down over 60-150 ms; the first reopen fails, the next (after the 200 ms backoff) works.
    stones = [(0, 400.0, 2.0), (300 * MS, 400.0, 2.0)]
    ts, trig = triggers(stones, 420 * MS, down=(60 * MS, 150 * MS))
    assert len(ts) == 2 and trig.reopens == 1 and trig.preview_failures >= 1


def test_zone_outside_the_view_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="outside the camera's view"):
        triggers([], 10 * MS, zone_from_mm=40.0, zone_to_mm=45.0)
    with pytest.raises(config.ConfigError, match="zone_to_mm = 5.0 must be above"):
        load_config(config.sim_config_path(), {"trigger": {"type": "vision", "zone_to_mm": 5.0}})


@pytest.mark.slow
def test_simulated_machine_sorts_with_the_vision_trigger(tmp_path: Path) -> None:
    cfg = load_config(config.sim_config_path(), {"trigger": {"type": "vision"}, "record": {"log_dir": str(tmp_path)},
                                                "metrics": {"port": 0}, "sim": {"seed": 8}})
    run(cfg, RunOptions(stones=120, json_path=tmp_path / "s.json", progress=False), io.StringIO())
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["stones_fed"] == 120 and sum(s["bins"].values()) == 120
    # Compute time is real even on the virtual clock: a loaded machine takes fewer previews (115-119 seen).
    assert s["stones_seen"] >= 112
    assert s["landed_as_decided_rate"] >= 0.93
    assert s["deadline_misses"] == 0
    assert s["captures"] <= 1.2 * s["stones_seen"]  # about one pair per stone, not a pair per preview
    # Stones the previews missed have no edge: the ledger counts the triggered ones only.
    assert s["passed_unseen"] <= s["unseen_stones"]
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]


def test_a_preview_whose_strobe_was_not_lit_is_never_a_stone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused or unlit preview strobe gives a dark frame, unlike the reference everywhere:
    it must be dropped (counted), not read as a stone entering."""
    from sorterd.parts.lights import StrobeResult, done

    def unlit(self: SimLights, mode: str, t_on: int, t_off: int) -> Any:
        return done(StrobeResult(mode, None, None, "refused: controller: late at fire"))

    monkeypatch.setattr(SimLights, "strobe", unlit)
    ts, trig = triggers([(0, 400.0, 2.0)], 100 * MS)
    assert ts == [] and trig.previews == 0 and trig.preview_failures >= 15


def test_camera_reopen_backoff_is_the_configured_one_for_every_camera_backend() -> None:
    """The vision trigger (like the pipeline) waits camera.reopen_backoff_ms between attempts
    to get a lost camera back.  It used to probe the options for it and fall back to 200 ms
    where a backend's options lacked it (the simulated camera), while the documented default
    is 500 ms: every camera backend now declares it (CameraOptions)."""
    from sorterd.cli.compose import open_parts
    from sorterd.clock import VirtualClock

    def backoff_ns(overrides: dict[str, dict[str, Any]]) -> int:
        cfg = load_config(config.sim_config_path(), {"trigger": {"type": "vision"}, **overrides})

        async def main() -> int:
            parts = open_parts(cfg, VirtualClock())
            try:
                assert isinstance(parts.trigger, VisionTrigger)
                return parts.trigger.reopen_backoff_ns
            finally:
                parts.close()
        return asyncio.run(main())

    assert backoff_ns({}) == 500 * MS
    assert backoff_ns({"camera": {"reopen_backoff_ms": 750.0}}) == 750 * MS
