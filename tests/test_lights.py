"""Strobes (§2.2): the pulsed backends' actual edges, the pair audit, and what the
pipeline does with a pair that was not lit as it should have been."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run
from sorterd.clock import WallClock
from sorterd.parts.camera import Frame
from sorterd.parts.lights import StrobeError, StrobeResult, check_pair
from sorterd.parts.lights.pulsed import GpioLightsConfig, open_gpio_lights
from sorterd.sim.parts import lights as simlights
from sorterd.sorting.capture import capture_pair, lighting_fault
from sorterd.sorting.record import read_rows
from tests.test_valves_gpio import FakeGpiod, FakeJetsonGPIO, Value

MS = 1_000_000


class StampCamera:
    """Records when each frame was asked for; returns a flat image."""

    pixels_per_mm = 20.0
    exposure_at_strobe = True
    prelit = False
    pair_interval_ms = None

    def __init__(self, clock: WallClock) -> None:
        self.clock = clock
        self.lock = asyncio.Lock()
        self.grabs: list[tuple[str, int]] = []

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        self.grabs.append((mode, t_ns))
        return Frame(np.zeros((8, 8, 3), np.uint8), t_ns, mode)


def gpio_cfg(**kw: Any) -> GpioLightsConfig:
    # No SCHED_FIFO in a test process; a loaded CI box may wake the thread a few ms late.
    base = dict(rt_priority=0, late_limit_us=5000.0, lead_ms=3.0)
    return GpioLightsConfig(**{**base, **kw})


def test_gpio_strobes_light_each_frame_and_report_actual_edges() -> None:
    lib = FakeGpiod()
    cfg = gpio_cfg(pins={"backlit": 23, "toplit": 24}, camera_pin=25)

    async def main() -> tuple[Any, list[StrobeResult], str | None]:
        clock = WallClock()
        lights = open_gpio_lights(cfg, clock, lib=lib)
        try:
            for _ in range(5):
                lib.calls.clear()
                cam = StampCamera(clock)
                pair = await capture_pair(cam, lights, clock, 0, clock.now_ns(), 10 * MS, 20 * MS)
                fault, results = await lighting_fault(pair, clock, cam, lights)
                # A thread woken more than late_limit_us late (a very loaded box) refuses the edge
                # and the audit reports it, as it should; this test wants an undisturbed pair.
                if not (fault and "late at fire" in fault):
                    break
                await asyncio.sleep(0.05)
            return pair, results, fault
        finally:
            lights.all_off()

    pair, results, fault = asyncio.run(main())
    assert fault is None
    by = {r.mode: r for r in results}
    back, top = by["backlit"], by["toplit"]
    # Actual edges, as the thread stamped them: near the asked instants, never before them.
    assert back.on_ns >= pair.backlit.t_ns and back.on_ns - pair.backlit.t_ns < 5 * MS
    assert top.on_ns >= pair.toplit.t_ns and top.off_ns <= pair.dark_ns + 5 * MS
    assert back.camera_ns is not None and back.camera_ns >= pair.backlit.t_ns
    # The lines: backlight on then off, ring light on then off, camera pulsed twice; all off at the end.
    sets = [(a[0], a[1]) for name, a, _ in lib.calls if name == "set_value"]
    assert [v for o, v in sets if o == 23] == [Value.ACTIVE, Value.INACTIVE]
    assert [v for o, v in sets if o == 24] == [Value.ACTIVE, Value.INACTIVE]
    assert [v for o, v in sets if o == 25] == [Value.ACTIVE, Value.INACTIVE] * 2
    on_back = next(t for name, a, t in lib.calls if name == "set_value" and a == (23, Value.ACTIVE))
    on_top = next(t for name, a, t in lib.calls if name == "set_value" and a == (24, Value.ACTIVE))
    off_back = next(t for name, a, t in lib.calls if name == "set_value" and a == (23, Value.INACTIVE))
    assert on_back < off_back <= on_top  # never both lights at once
    assert lib.calls[-1][0] == "release"


def test_jetson_strobe_lines_and_a_strobe_too_soon_is_refused() -> None:
    lib = FakeJetsonGPIO()
    cfg = gpio_cfg(library="jetson", pins={"backlit": 29, "toplit": 31}, min_lead_ms=2.0)

    async def main() -> None:
        clock = WallClock()
        lights = open_gpio_lights(cfg, clock, lib=lib)
        try:
            now = clock.now_ns()
            with pytest.raises(StrobeError, match="backlit strobe refused: late"):
                lights.strobe("backlit", now + MS // 2, now + 5 * MS)
            with pytest.raises(StrobeError, match="max_on_ms"):
                lights.strobe("backlit", now + 5 * MS, now + 60 * MS)
            for _ in range(5):  # a thread woken past the late limit (a very loaded box) refuses it
                now = clock.now_ns()
                res = await lights.strobe("toplit", now + 4 * MS, now + 8 * MS)
                if not res.status.startswith("refused: late at fire"):
                    break
            # The thread's own stamps: never early, on within the late limit (a late off edge
            # only lengthens the strobe, which the pair audit catches).
            assert res.lit and now + 4 * MS <= res.on_ns <= now + 4 * MS + cfg.late_limit_us * 1000
            assert res.off_ns >= now + 8 * MS
            t = lights.timing()
            assert t["strobe_refusals"]["refused: late"] == 1
            assert set(t["strobe_refusals"]) <= {"refused: late", "refused: late at fire"}
            assert t["strobe_error_us"]["p50"] is not None
        finally:
            lights.all_off()

    asyncio.run(main())
    levels = [a[1] for name, a, _ in lib.calls if name == "output" and a[0] == 31]
    assert levels[:2] == [1, 0] and set(levels[2:]) == {0}  # one strobe, then only "off" (closing)


def _r(mode: str, on: int | None, off: int | None, status: str = "lit") -> StrobeResult:
    return StrobeResult(mode, on, off, status)


def test_pair_audit_names_what_was_wrong() -> None:
    ok = [_r("backlit", 0, 10), _r("toplit", 10, 20)]
    assert check_pair(ok, 0, 10, 20) is None
    assert check_pair([_r("backlit", None, None, "refused: late"), ok[1]], 0, 10, 20) == "backlit strobe refused: late"
    assert "missed its exposure" in check_pair([_r("backlit", 1, 10), ok[1]], 0, 10, 20)
    # A free-running camera: its timestamps are its own, only the strobes are checked.
    assert check_pair([_r("backlit", 1, 10), ok[1]], 0, 10, 20, exposures_known=False) is None
    assert "still on" in check_pair([ok[0], _r("toplit", 10, 25 * MS)], 0, 10, 20)
    assert "backlight still on" in check_pair([_r("backlit", 0, 12), ok[1]], 0, 10, 20)
    assert check_pair([ok[0]], 0, 10, 20) == "toplit strobe missing"


def test_config_refuses_lights_that_cannot_work() -> None:
    with pytest.raises(config.ConfigError, match="lights.type = 'mcu' uses the valve controller"):
        load_config(config.sim_config_path(), {"lights": {"type": "mcu"}})
    with pytest.raises(config.ConfigError, match="reuse controller pin"):
        load_config(config.sim_config_path(), {"valves": {"type": "mcu"}, "sim": {"clock": "wall"},
                                               "lights": {"type": "mcu", "pins": {"backlit": 2, "toplit": 6}}})
    with pytest.raises(config.ConfigError, match="lights.lead_ms = 1.0 is below lights.min_lead_ms"):
        load_config(config.sim_config_path(), {"lights": {"type": "gpio", "lead_ms": 1.0}})


@pytest.mark.slow
def test_pairs_whose_strobe_failed_take_the_safe_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 7th pair's backlight 'fails' (as a controller would report a strobe it refused)."""
    real = simlights.SimLights.strobe
    count = {"n": 0}

    def flaky(self: Any, mode: str, t_on: int, t_off: int) -> Any:
        fut = real(self, mode, t_on, t_off)
        if mode == "backlit" and t_off - t_on > 5 * MS:  # pair strobes (not previews)
            count["n"] += 1
            if count["n"] % 7 == 0:
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(StrobeResult(mode, None, None, "refused: controller: late at fire"))
        return fut

    monkeypatch.setattr(simlights.SimLights, "strobe", flaky)
    cfg = load_config(config.sim_config_path(), {"record": {"log_dir": str(tmp_path)}, "metrics": {"port": 0}})
    res = run(cfg, RunOptions(stones=80, json_path=tmp_path / "s.json", progress=False), io.StringIO())
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lighting_faults"] == count["n"] // 7 >= 8
    rows = read_rows(res.batch_dir / "stones.db")
    dark = [r for r in rows if r["reason"].startswith("lighting: backlit strobe refused")]
    # Every stone new in a faulted pair took the safe route.  Most such pairs have one; on a
    # loaded box a pair taken late may hold only stones an earlier pair already decided.
    faulted = {r["capture_seq"] for r in dark}
    assert all(r in dark for r in rows if r["capture_seq"] in faulted)
    assert s["lighting_faults"] / 2 <= len(faulted) <= s["lighting_faults"]
    assert all(r["bin"] == "REJECT" and r["color"] is None for r in dark)  # safe route, never classified
    lit = [r for r in rows if not r["reason"].startswith("lighting")]
    assert all(r["backlit_on_ns"] == r["t_backlit_ns"] for r in lit)  # sim lights: exactly as asked


@pytest.mark.slow
@pytest.mark.host_build
def test_strobes_on_the_controller_firmware(tmp_path: Path) -> None:
    """`--valves mcu --lights mcu`: strobes are pulses on the firmware's spare outputs."""
    pytest.importorskip("serial")
    from sorterd.cli import main

    code = main(["run", "--sim", "--valves", "mcu", "--lights", "mcu", "--stones", "60", "--rate", "30",
                 "--seed", "5", "--log-dir", str(tmp_path), "--json", str(tmp_path / "s.json"), "--no-progress",
                 "--metrics-port", "0"])
    assert code == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["stones_fed"] == 60
    # The firmware's host build is a process on a shared VM: its timer thread sometimes wakes late
    # (0 pairs in 60 on an idle box, 15 on CI, ~40 with the timer thread denied SCHED_FIFO beside
    # two busy loops), and it then refuses the edge or the audit catches a late off edge.  A real
    # board's timer does not; what must hold on any box is that each such pair is counted, its
    # stones take the safe route, and every stone lands where it was routed.
    assert 0 <= s["lighting_faults"] <= 50
    assert round((1 - s["landed_as_routed_rate"]) * 60) <= s["late_off_edges"], s["misrouted"]
    assert s["passed_unseen"] == s["unseen_beam_events"] <= 5
    assert s["strobe_error_us"]["p50"] is not None and s["strobe_error_us"]["p50"] < 500
    rows = read_rows(Path(s["batch_dir"]) / "stones.db")
    faulted = [r for r in rows if r["reason"].startswith("lighting")]
    assert all(r["bin"] == "REJECT" and r["color"] is None for r in faulted)
    # Pairs that passed the audit (a faulted pair may have one strobe's edges and not the other's).
    lit = [r for r in rows if not r["reason"].startswith("lighting")]
    assert len(lit) + len(faulted) == len(rows) and len(lit) >= 5 and all(r["backlit_on_ns"] is not None and r["toplit_off_ns"] is not None for r in lit)
    # The controller's reported edges (through the clock sync) bracket the exposures.
    assert all(abs(r["backlit_on_ns"] - r["t_backlit_ns"]) < 1 * MS for r in lit)
    assert all(r["toplit_off_ns"] - r["backlit_on_ns"] == pytest.approx(20 * MS, abs=1 * MS) for r in lit)

