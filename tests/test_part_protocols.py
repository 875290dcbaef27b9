"""The parts' declared capabilities (sorterd/parts/*/__init__.py Protocols): used as declared, never probed."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

from sorterd import config
from sorterd.controller.outputs import ValveStats
from sorterd.metrics import Metrics
from sorterd.parts.trigger.vision import VisionTrigger, VisionTriggerConfig
from sorterd.parts.valves.dry import DryValves
from sorterd.sim.parts.lights import SimLights, SimLightsConfig
from sorterd.sorting.capture import capture_pair
from sorterd.sorting.stats import RunStats
from sorterd.sorting.summary import summarize, valve_summary
from tests.test_lights import StampCamera
from tests.test_trigger_vision import MovingStones, StepClock

PKG = Path(__file__).resolve().parent.parent / "sorterd"
MS = 1_000_000

# Names a part object goes by in sorterd (a config section's options are `cfg...`, `*_cfg`).
PART_NAMES = {"camera", "cam", "lights", "trigger", "valves", "outputs", "rig", "model", "parts"}
# The composition root may look around; the options modules handle config sections, not parts.
SKIP = {"cli", "config.py", "configfile.py"}


def _probes(source: str, where: str) -> list[str]:
    """getattr/hasattr calls in one module's source whose object is a part (not its config options)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and node.args):
            continue
        words = set(ast.unparse(node.args[0]).split("."))
        if any("cfg" in w for w in words):
            continue  # options (registry's business), not the part
        if words & PART_NAMES:
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_part_object_is_probed_outside_the_composition_root() -> None:
    """A capability a caller needs is declared on the part's Protocol; only sorterd/cli/ may look around."""
    probes = [p for f in sorted(PKG.rglob("*.py")) if not set(f.relative_to(PKG).parts) & SKIP
              for p in _probes(f.read_text(), str(f.relative_to(PKG.parent)))]
    assert probes == [], "declare these on the part's Protocol instead:\n" + "\n".join(probes)


def test_the_probe_check_sees_a_probe() -> None:
    """The check above is not vacuous: a probe on a camera is caught, one on its options is not."""
    src = ('def f(camera, cfg, self):\n    getattr(camera, "prelit", False)\n    getattr(cfg.camera, "x", 1)\n'
           '    hasattr(self.parts.trigger, "set_reference")\n')
    assert _probes(src, "sample") == ["sample:2: getattr(camera, 'prelit', False)",
                                      "sample:4: hasattr(self.parts.trigger, 'set_reference')"]


def test_pair_capture_waits_for_whoever_holds_the_cameras_lock() -> None:
    clock = StepClock()
    cam = StampCamera(clock)  # type: ignore[arg-type]

    async def main() -> tuple[int, int]:
        await cam.lock.acquire()  # a vision preview is exposing
        task = asyncio.create_task(capture_pair(cam, SimLights(SimLightsConfig()), clock, 0,  # type: ignore[arg-type]
                                                clock.now_ns(), 10 * MS, 20 * MS))
        for _ in range(20):
            await asyncio.sleep(0)
        during = len(cam.grabs)
        cam.lock.release()
        await task
        return during, len(cam.grabs)

    assert asyncio.run(main()) == (0, 2)


def test_vision_previews_wait_for_a_pair_holding_the_cameras_lock() -> None:
    clock = StepClock()
    base = clock.now_ns()
    cam = MovingStones(clock, [])

    async def main() -> tuple[int, int]:
        trig = VisionTrigger(VisionTriggerConfig(), cam, SimLights(SimLightsConfig()),
                             clock, stop_at=lambda: base + 50 * MS)  # type: ignore[arg-type]
        await cam.lock.acquire()  # a pair is being captured
        task = asyncio.create_task(trig.next())
        for _ in range(20):
            await asyncio.sleep(0)
        during = trig.previews
        cam.lock.release()
        assert await task is None  # an empty channel until the end
        return during, trig.previews

    during, after = asyncio.run(main())
    assert during == 0 and after > 0


def test_lights_and_valves_without_timing_add_nothing_to_the_summary(sim_cfg: config.Config) -> None:
    clock = StepClock()
    s = summarize(sim_cfg, RunStats(), None, "v1", 0.0, valves=DryValves(clock),  # type: ignore[arg-type]
                  lights=SimLights(SimLightsConfig()))
    assert "strobe_error_us" not in s and "valves" not in s and "valve_refusals" not in s
    assert valve_summary({}, None, valves=DryValves(clock)) == {}  # type: ignore[arg-type]


class TimedLights(SimLights):
    def timing(self) -> dict[str, Any] | None:
        return {"strobe_error_us": {"p50": 1.0, "p99": 2.0, "max": 3.0}, "strobe_refusals": {}}


class TimedValves(DryValves):
    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.st = ValveStats("mcu")
        self.st.fired(1_000_000, 1_000_020)

    def stats(self) -> ValveStats | None:
        return self.st


def test_declared_timing_is_what_the_summary_reports(sim_cfg: config.Config) -> None:
    clock = StepClock()
    s = summarize(sim_cfg, RunStats(), None, "v1", 0.0, valves=TimedValves(clock),  # type: ignore[arg-type]
                  lights=TimedLights(SimLightsConfig()))
    assert s["strobe_error_us"] == {"p50": 1.0, "p99": 2.0, "max": 3.0} and s["strobe_refusals"] == {}
    assert s["valve_refusals"] == 0 and "valves" in s


def test_prometheus_shows_no_valve_figures_for_valves_without_them() -> None:
    m = Metrics()
    m.watch_valves(DryValves(StepClock()))  # type: ignore[arg-type]
    names = {metric.name for metric in m.registry.collect()}
    assert "sorterd_valve_fire_error_seconds" not in names and "sorterd_valve_refusals" not in names
    m2 = Metrics()
    m2.watch_valves(TimedValves(StepClock()))
    assert "sorterd_valve_fire_error_seconds" in {metric.name for metric in m2.registry.collect()}
