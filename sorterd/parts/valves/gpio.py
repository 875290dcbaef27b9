"""`[valves] type = "gpio"`: the valve lines on Jetson.GPIO or libgpiod (`library`).

Thin: the options and the opener.  The real-time output thread that drives
the lines is `sorterd/controller/gpio.py` (the `gpio` lights use it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sorterd.configfile import ConfigError, check_pins, opt
from sorterd.controller.gpio import GpioLibraryOptions, GpioLines, GpioValves, open_gpio_valves
from sorterd.domain import JET_BINS
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.valves import ValveOptions
from sorterd.parts.valves.mcu import pulse_limits


@dataclass(frozen=True)
class GpioValvesConfig(GpioLibraryOptions, ValveOptions):
    type: str = opt("gpio", "Backend: gpio -- valve lines (Jetson.GPIO or libgpiod, see `library`) driven by a "
                    "real-time thread on the host (no fail-safe if the process dies; see hw/README.md).",
                    choices=("gpio",))
    pins: dict = opt({"CUT": 17, "SELECT": 27, "FLIP": 22},
                     "Line of each bin's valve driver (keys CUT, SELECT, FLIP): a gpiod line offset on `chip`, or a "
                     "Jetson header pin in `numbering` (e.g. 31, 33, 35 in BOARD numbering).")
    max_on_ms: float = opt(40.0, "Longest a valve may stay open (enforced by the RT thread; at least ejection.max_pulse_ms).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(500.0, "An edge whose thread wakes more than this after its start is refused, never fired late (at most ejection.margin_ms).", minval=0.0, maxval=5000.0)
    min_lead_ms: float = opt(2.0, "Pulses starting sooner than this are refused (the thread sleeps until ~spin_us before an edge).", minval=0.5, maxval=100.0)
    spin_us: float = opt(300.0, "The thread sleeps until this long before an edge, then spins.", minval=0.0, maxval=5000.0)
    rt_priority: int = opt(50, "SCHED_FIFO priority of the valve thread when permitted; 0 = normal scheduling.", minval=0, maxval=99)
    switch_interval_us: float = opt(
        200.0, "Python's GIL switch interval while the valves run (the default 5 ms would let another thread "
        "hold the GIL through an edge); 0 = leave it.", minval=0.0, maxval=5000.0,
    )
    active_low: bool = opt(False, "The valve drivers switch on at a low level.")

    def __post_init__(self) -> None:
        problems = check_pins("valves", self.pins, JET_BINS, 1023)
        if problems:
            raise ConfigError(problems)

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        return pulse_limits(self, sections)

    def lines(self) -> GpioLines:
        """The output thread's options, from this section."""
        return GpioLines(library=self.library, chip=self.chip, numbering=self.numbering,
                         pins={v: int(p) for v, p in self.pins.items()}, active_low=self.active_low,
                         max_on_ms=self.max_on_ms, late_limit_us=self.late_limit_us, min_lead_ms=self.min_lead_ms,
                         spin_us=self.spin_us, rt_priority=self.rt_priority,
                         switch_interval_us=self.switch_interval_us)


def _open(cfg: GpioValvesConfig, opening: Opening) -> GpioValves:
    return open_gpio_valves(cfg.lines(), opening.clock, opening.edge_observer)


BACKEND = Backend("valves", "gpio", GpioValvesConfig, _open)
