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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import ConfigError, check_pins, opt
from sorterd.controller.gpio import GpioLibraryOptions, GpioLines
from sorterd.controller.outputs import Pulse, PulseOutcome
from sorterd.domain import LIGHT_MODES
from sorterd.parts.lights import LightsOptions, StrobeError, StrobeResult
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.valves.gpio import GpioValvesConfig
from sorterd.parts.valves.mcu import McuValvesConfig
from sorterd.quantiles import Samples

if TYPE_CHECKING:
    from sorterd.controller.mcu import McuValves

log = logging.getLogger(__name__)

CAMERA = "camera"


@dataclass(frozen=True)
class McuLightsConfig(LightsOptions):
    type: str = opt("mcu", "Backend: mcu -- strobe outputs of the valve controller (hw/), timed by its hardware timer "
                    "(needs valves.type = 'mcu': one controller, one clock sync).", choices=("mcu",))
    lead_ms: float = opt(3.0, "A pair's t0 is this far after the trigger is taken: the strobe commands must reach the "
                         "controller first (at least valves.min_lead_ms).", minval=0.1, maxval=50.0)
    pins: dict = opt({"backlit": 5, "toplit": 6}, "Controller GPIO driving each light's strobe driver (keys backlit, toplit).")
    camera_pin: int = opt(-1, "Controller GPIO wired to the camera's trigger input (camera.trigger = 'hardware'); -1 = none.",
                          minval=-1, maxval=255)
    camera_pulse_us: float = opt(100.0, "Width of the camera trigger pulse.", minval=1.0, maxval=10_000.0)
    active_low: bool = opt(False, "The strobe drivers switch on at a low level.")
    max_on_ms: float = opt(25.0, "Longest a light may stay on, enforced by the firmware (at least lights_off_ms).",
                           minval=1.0, maxval=1000.0)

    def __post_init__(self) -> None:
        problems = check_pins("lights", self.pins, LIGHT_MODES, 255, self.camera_pin)
        if self.max_on_ms < self.lights_off_ms - self.pair_interval_ms or self.max_on_ms < self.pair_interval_ms:
            problems.append(f"lights.max_on_ms = {self.max_on_ms} would cut a strobe short (pair_interval_ms = "
                            f"{self.pair_interval_ms}, lights_off_ms = {self.lights_off_ms})")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        """One controller serves valves and strobes: it must be there, early enough, on free pins."""
        valves = sections["valves"]
        if not isinstance(valves, McuValvesConfig):
            return [f"lights.type = 'mcu' uses the valve controller's strobe outputs, but valves.type = "
                    f"{valves.type!r}: set valves.type = 'mcu' (one controller, one clock sync) or lights.type = 'gpio'"]
        problems = []
        if self.lead_ms < valves.min_lead_ms:
            problems.append(f"lights.lead_ms = {self.lead_ms} is below valves.min_lead_ms = {valves.min_lead_ms}: "
                            "the controller would refuse every strobe")
        taken = {str(p) for p in valves.pins.values()} & ({str(p) for p in self.pins.values()}
                                                           | ({str(self.camera_pin)} if self.camera_pin >= 0 else set()))
        if taken:
            problems.append(f"lights.pins / lights.camera_pin reuse controller pin(s) {sorted(taken)} of valves.pins: "
                            "every output needs its own pin")
        return problems

    def outputs(self) -> dict[str, tuple[int, float, bool]]:
        """The controller outputs these lights need, for McuValves(extra_outputs=...)."""
        out = {mode: (int(pin), float(self.max_on_ms), bool(self.active_low)) for mode, pin in self.pins.items()}
        if self.camera_pin >= 0:
            out[CAMERA] = (int(self.camera_pin), max(1.0, self.camera_pulse_us / 1e3 * 2), bool(self.active_low))
        return out


@dataclass(frozen=True)
class GpioLightsConfig(GpioLibraryOptions, LightsOptions):
    type: str = opt("gpio", "Backend: gpio -- strobe lines driven by one real-time thread on the host (Jetson.GPIO or "
                    "libgpiod).", choices=("gpio",))
    lead_ms: float = opt(3.0, "A pair's t0 is this far after the trigger is taken (at least min_lead_ms).",
                         minval=0.5, maxval=50.0)
    pins: dict = opt({"backlit": 23, "toplit": 24}, "Line (gpiod offset or Jetson header pin) of each light's strobe driver.")
    camera_pin: int = opt(-1, "Line wired to the camera's trigger input (camera.trigger = 'hardware'); -1 = none.",
                          minval=-1, maxval=1023)
    camera_pulse_us: float = opt(100.0, "Width of the camera trigger pulse.", minval=1.0, maxval=10_000.0)
    active_low: bool = opt(False, "The strobe drivers switch on at a low level.")
    max_on_ms: float = opt(25.0, "Longest a light may stay on (enforced by the thread).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(300.0, "A strobe whose thread wakes more than this after its start is refused (the frame "
                               "would be half lit); the pair's stones take the safe route.", minval=0.0, maxval=5000.0)
    min_lead_ms: float = opt(2.0, "Strobes starting sooner than this are refused.", minval=0.5, maxval=100.0)
    spin_us: float = opt(300.0, "The thread sleeps until this long before an edge, then spins.", minval=0.0, maxval=5000.0)
    rt_priority: int = opt(50, "SCHED_FIFO priority of the strobe thread when permitted; 0 = normal scheduling.",
                           minval=0, maxval=99)
    switch_interval_us: float = opt(0.0, "Python's GIL switch interval (0 = leave it; the valve backend sets it).",
                                    minval=0.0, maxval=5000.0)

    def __post_init__(self) -> None:
        problems = check_pins("lights", self.pins, LIGHT_MODES, 1023, self.camera_pin)
        if self.lead_ms < self.min_lead_ms:
            problems.append(f"lights.lead_ms = {self.lead_ms} is below lights.min_lead_ms = {self.min_lead_ms}: "
                            "every strobe would be refused")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        valves = sections["valves"]
        if isinstance(valves, GpioValvesConfig) and valves.library != self.library:
            return [f"lights.library = {self.library!r} with valves.library = {valves.library!r}: one board, one "
                    "GPIO library"]
        return []

    def lines(self) -> GpioLines:
        """The output thread's options, from this section: the strobe lines (and the camera's)."""
        pins = {mode: int(p) for mode, p in self.pins.items()}
        if self.camera_pin >= 0:
            pins[CAMERA] = self.camera_pin
        return GpioLines(library=self.library, chip=self.chip, numbering=self.numbering, pins=pins,
                         active_low=self.active_low, max_on_ms=self.max_on_ms, late_limit_us=self.late_limit_us,
                         min_lead_ms=self.min_lead_ms, spin_us=self.spin_us, rt_priority=self.rt_priority,
                         switch_interval_us=self.switch_interval_us)


class PulsedLights:
    """Strobes on any pulse device with the Valves interface (schedule/outcome)."""

    def __init__(self, cfg: McuLightsConfig | GpioLightsConfig, outputs: Any, clock: Clock, owns_outputs: bool,
                 late_limit_us: float) -> None:
        self.cfg = cfg
        self.outputs = outputs
        self.clock = clock
        self.lead_ns = int(cfg.lead_ms * 1e6)
        # Edges fire at most the output device's late limit after their time (later: refused).
        self.tolerance_ns = int(late_limit_us * 1e3)
        self.camera_pulse_ns = int(cfg.camera_pulse_us * 1e3) if cfg.camera_pin >= 0 else 0
        self._owns = owns_outputs  # gpio: our own thread; mcu: the valves' controller
        self._tasks: set[asyncio.Task[StrobeResult]] = set()
        # Actual minus intended edge (ns), both edges of every strobe: the timing report.
        self.error_ns = Samples(floor=1.0)  # bounded: sorterd/quantiles.py
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
            a = self.error_ns.exact_array()
            if a is not None:
                a = np.abs(a) / 1e3
                p50, p99 = float(np.percentile(a, 50)), float(np.percentile(a, 99))
            else:  # a long run: from the bounded histogram (within quantiles.REL_ERROR)
                p50, p99 = (self.error_ns.quantile(q, absolute=True) / 1e3 for q in (0.5, 0.99))
            out["strobe_error_us"] = {"p50": round(p50, 2), "p99": round(p99, 2),
                                      "max": round(self.error_ns.max_abs / 1e3, 2)}
        return out

    def all_off(self) -> None:
        if self._owns:
            self.outputs.close()  # the gpio thread: lines off, thread ended
        # mcu: the valves' close() resets the controller (every output off)


def open_mcu_lights(cfg: McuLightsConfig, valves: McuValves, clock: Clock) -> PulsedLights:
    """The strobes on the valve controller (configured as extra outputs of `valves`)."""
    return PulsedLights(cfg, valves, clock, owns_outputs=False, late_limit_us=valves.cfg.late_limit_us)


def open_gpio_lights(cfg: GpioLightsConfig, clock: Clock, lib: Any = None) -> PulsedLights:
    """The strobe lines on a real-time thread of their own (lib: a stand-in, in tests)."""
    from sorterd.controller.gpio import GpiodDriver, GpioValves, JetsonDriver

    lines = cfg.lines()
    driver = (JetsonDriver(lines, lib, "lights") if cfg.library == "jetson"
              else GpiodDriver(lines, lib, "lights"))
    try:
        outputs = GpioValves(lines, driver, clock, f"lights-{cfg.library}")
    except BaseException:
        driver.close()
        raise
    return PulsedLights(cfg, outputs, clock, owns_outputs=True, late_limit_us=cfg.late_limit_us)


def _open_mcu(cfg: McuLightsConfig, opening: Opening) -> PulsedLights:
    from sorterd.controller.mcu import McuValves

    if not isinstance(opening.valves, McuValves):
        raise ValueError("lights.type = 'mcu' needs valves.type = 'mcu' (the strobes are the controller's outputs)")
    return open_mcu_lights(cfg, opening.valves, opening.clock)


def _open_gpio(cfg: GpioLightsConfig, opening: Opening) -> PulsedLights:
    return open_gpio_lights(cfg, opening.clock)


MCU_BACKEND = Backend("lights", "mcu", McuLightsConfig, _open_mcu)
GPIO_BACKEND = Backend("lights", "gpio", GpioLightsConfig, _open_gpio)
