"""Strobes as timed pulses: `mcu` (the valve controller's spare outputs) and
`gpio` (lines driven by a real-time host thread).

A strobe is a pulse on the light's output over [t_on, t_off), scheduled ahead
at an absolute time, exactly like a valve pulse -- so both backends reuse the
valve machinery: `McuValves` (the controller fires it from its hardware timer
and reports the actual edges in its clock, converted to host time by the
clock sync) or `GpioValves` (one SCHED_FIFO thread, sleep then spin, the edge
stamped right after the line was written).  Neither ever lights late: a strobe
that cannot start on time is refused, the pair is not classified, and its
stones take the safe route.

With `camera_pin`, each strobe also sends a short pulse on the camera's
trigger input at t_on, so the exposure starts inside its strobe (camera
`trigger = "hardware"`); its actual edge is the frame's true exposure start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np

from sorterd.clock import Clock
from sorterd.controller.outputs import SAMPLES, Pulse, PulseOutcome
from sorterd.parts.lights import StrobeError, StrobeResult
from sorterd.parts.valves import Valves

log = logging.getLogger(__name__)

CAMERA = "camera"


class PulsedLights:
    """Strobes on any pulse device with the Valves interface (schedule/outcome)."""

    def __init__(self, cfg: Any, outputs: Any, clock: Clock, owns_outputs: bool) -> None:
        self.cfg = cfg
        self.outputs = outputs
        self.clock = clock
        self.lead_ns = int(cfg.lead_ms * 1e6)
        # Edges fire at most the backend's late limit after their time (later: refused).
        self.tolerance_ns = int(getattr(outputs.cfg, "late_limit_us", 0) * 1e3)
        self.camera_pulse_ns = int(cfg.camera_pulse_us * 1e3) if cfg.camera_pin >= 0 else 0
        self._owns = owns_outputs  # gpio: our own thread; mcu: the valves' controller
        self._tasks: set[asyncio.Task[StrobeResult]] = set()
        # Actual minus intended edge (ns), both edges of every strobe: the timing report.
        self.error_ns: deque[int] = deque(maxlen=SAMPLES)
        self.refusals: dict[str, int] = {}

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> asyncio.Task[StrobeResult]:
        if t_off_ns - t_on_ns > self.cfg.max_on_ms * 1e6:
            raise StrobeError(f"{mode} strobe of {(t_off_ns - t_on_ns) / 1e6:.2f} ms exceeds lights.max_on_ms = "
                              f"{self.cfg.max_on_ms}")
        pulse = Pulse(mode, t_on_ns, t_off_ns, f"strobe-{mode}-{t_on_ns}")
        self._schedule(pulse)
        cam = None
        if self.camera_pulse_ns:
            cam = Pulse(CAMERA, t_on_ns, t_on_ns + self.camera_pulse_ns, f"camera-{mode}-{t_on_ns}")
            try:
                self._schedule(cam)
            except StrobeError:
                self.outputs.cancel(pulse)  # no exposure without its light, no light without its exposure
                raise
        task = asyncio.get_running_loop().create_task(self._result(mode, pulse, cam))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule(self, pulse: Pulse) -> None:
        refusal = self.outputs.schedule(pulse)
        if refusal:
            kind = refusal.split("(")[0].strip()
            self.refusals[kind] = self.refusals.get(kind, 0) + 1
            raise StrobeError(f"{pulse.valve} strobe {refusal}")

    async def _result(self, mode: str, pulse: Pulse, cam: Pulse | None) -> StrobeResult:
        out: PulseOutcome = await self.outputs.outcome(pulse)
        cam_out = await self.outputs.outcome(cam) if cam is not None else None
        if not out.fired or out.actual_on_ns is None or out.actual_off_ns is None:
            return StrobeResult(mode, None, None, out.status)
        self.error_ns.extend((out.actual_on_ns - pulse.start_ns, out.actual_off_ns - pulse.end_ns))
        if out.status != "fired":  # cut short by max on-time or the watchdog
            return StrobeResult(mode, out.actual_on_ns, out.actual_off_ns, out.status)
        if cam is not None and (cam_out is None or not cam_out.fired):
            return StrobeResult(mode, out.actual_on_ns, out.actual_off_ns,
                                f"camera trigger {cam_out.status if cam_out else 'missing'}")
        cam_ns = cam_out.actual_on_ns if cam_out is not None else None
        return StrobeResult(mode, out.actual_on_ns, out.actual_off_ns, "lit", cam_ns)

    def timing(self) -> dict[str, Any]:
        """|actual - intended| of the strobe edges, for the run summary."""
        out: dict[str, Any] = {"strobe_error_us": {"p50": None, "p99": None, "max": None},
                               "strobe_refusals": dict(self.refusals)}
        if self.error_ns:
            a = np.abs(np.asarray(self.error_ns, dtype=float)) / 1e3
            out["strobe_error_us"] = {"p50": round(float(np.percentile(a, 50)), 2),
                                      "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}
        return out

    def all_off(self) -> None:
        if self._owns:
            self.outputs.close()  # the gpio thread: lines off, thread ended
        # mcu: the valves' close() resets the controller (every output off)


def open_mcu_lights(cfg: Any, valves: Valves, clock: Clock) -> PulsedLights:
    """The strobes on the valve controller (configured as extra outputs of `valves`)."""
    return PulsedLights(cfg, valves, clock, owns_outputs=False)


def mcu_outputs(cfg: Any) -> dict[str, tuple[int, float, bool]]:
    """The controller outputs the `mcu` lights need, for McuValves(extra_outputs=...)."""
    out = {mode: (int(pin), float(cfg.max_on_ms), bool(cfg.active_low)) for mode, pin in cfg.pins.items()}
    if cfg.camera_pin >= 0:
        out[CAMERA] = (int(cfg.camera_pin), max(1.0, cfg.camera_pulse_us / 1e3 * 2), bool(cfg.active_low))
    return out


def open_gpio_lights(cfg: Any, clock: Clock, lib: Any = None) -> PulsedLights:
    """The strobe lines on a real-time thread of their own (lib: a stand-in, in tests)."""
    from sorterd.controller.gpio import GpiodDriver, GpioValves, JetsonDriver

    pins = dict(cfg.pins)
    if cfg.camera_pin >= 0:
        pins[CAMERA] = cfg.camera_pin
    # The valve thread's options, read from the lights' section.
    line_cfg = SimpleNamespace(
        type=cfg.library, pins=pins, chip=cfg.chip, numbering=cfg.numbering, active_low=cfg.active_low,
        max_on_ms=cfg.max_on_ms, late_limit_us=cfg.late_limit_us, min_lead_ms=cfg.min_lead_ms,
        spin_us=cfg.spin_us, rt_priority=cfg.rt_priority, switch_interval_us=cfg.switch_interval_us,
    )
    driver = (JetsonDriver(line_cfg, lib, "lights") if cfg.library == "jetson"
              else GpiodDriver(line_cfg, lib, "lights"))
    try:
        lines = GpioValves(line_cfg, driver, clock, f"lights-{cfg.library}")
    except BaseException:
        driver.close()
        raise
    return PulsedLights(cfg, lines, clock, owns_outputs=True)
