"""`[valves] type = "mcu"`: the valve-controller firmware (hw/) over a serial port.

Thin: the options and the opener.  The link itself -- framing, clock sync,
reconnects, the fail-safe arming -- is `sorterd/controller/mcu.py`.  The
backend takes a port: the composition root hands it the firmware host
build's pseudo-terminal when the machine is simulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sorterd.configfile import ConfigError, check_pins, opt
from sorterd.controller.outputs import ClockTruth
from sorterd.domain import JET_BINS
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.valves import ValveOptions

if TYPE_CHECKING:
    from sorterd.controller.mcu import McuValves


class TimedValveOptions(Protocol):
    """Options of a backend that times its own edges (mcu, gpio)."""

    @property
    def max_on_ms(self) -> float: ...

    @property
    def late_limit_us(self) -> float: ...


def pulse_limits(valves: TimedValveOptions, sections: dict[str, Any]) -> list[str]:
    """A timed valve backend's on-time and late limits against the ejection plan."""
    ejection = sections["ejection"]
    problems = []
    if valves.max_on_ms < ejection.max_pulse_ms:
        problems.append(f"valves.max_on_ms = {valves.max_on_ms} is below ejection.max_pulse_ms = "
                        f"{ejection.max_pulse_ms}: every long pulse would be cut; raise valves.max_on_ms")
    if valves.late_limit_us > ejection.margin_ms * 1000:
        problems.append(f"valves.late_limit_us = {valves.late_limit_us} is above ejection.margin_ms = "
                        f"{ejection.margin_ms} ms: an edge that late would leave the start of the stone's passage "
                        "without jet; lower valves.late_limit_us or raise ejection.margin_ms")
    return problems


@dataclass(frozen=True)
class McuValvesConfig(ValveOptions):
    type: str = opt("mcu", "Backend: mcu -- the valve-controller firmware (hw/) fires pulses from its hardware timer; "
                    "the host keeps its clock in sync over serial.", choices=("mcu",))
    port: str = opt(
        "/dev/serial/by-id/usb-sorterd_valves-if00",
        "Serial device of the controller.  With the simulated machine (camera or trigger type 'sim') the "
        "firmware's host build runs on a pseudo-terminal instead, driving the simulated jets (see [sim] controller_*).",
    )
    baudrate: int = opt(250000, "Serial speed (ignored by USB CDC boards such as the RP2040).", minval=9600, maxval=12_000_000)
    pins: dict = opt({"CUT": 2, "SELECT": 3, "FLIP": 4}, "Controller GPIO driving each bin's valve driver (keys CUT, SELECT, FLIP).")
    active_low: bool = opt(False, "The valve drivers switch on at a low level (default: high = open).")
    max_on_ms: float = opt(
        40.0, "Longest a valve may stay open, enforced by the firmware whatever the host sends "
        "(at least ejection.max_pulse_ms).", minval=1.0, maxval=1000.0,
    )
    silence_ms: float = opt(
        200.0, "Host silence after which the firmware turns every valve off and keeps it off until the host "
        "re-arms (the fail-safe against a crashed or killed daemon).", minval=10.0, maxval=5000.0,
    )
    heartbeat_ms: float = opt(50.0, "Heartbeat interval when nothing else is sent (well below silence_ms).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(
        500.0, "A pulse whose timer runs more than this after its start is refused by the firmware, never fired "
        "late (at most ejection.margin_ms: up to that a late edge still covers the whole passage).",
        minval=0.0, maxval=5000.0,
    )
    min_lead_ms: float = opt(1.0, "Pulses starting sooner than this are refused by the host (the command must reach the controller first).", minval=0.1, maxval=100.0)
    sync_interval_ms: float = opt(50.0, "Clock-sync exchange interval once synchronised.", minval=5.0, maxval=5000.0)
    sync_timeout_ms: float = opt(3000.0, "No good clock-sync sample for this long: pulses are refused until there is one.", minval=50.0, maxval=60_000.0)
    max_sync_error_us: float = opt(
        500.0, "A pulse is sent only if the clock sync's error bound at its start (the fit's uncertainty plus the "
        "drift possible since the last good sample) is within this; a host stall ages the sync, it does not lose it "
        "(with late_limit_us at most ejection.margin_ms: a pulse off by both still covers the passage).",
        minval=10.0, maxval=5000.0,
    )
    link_timeout_ms: float = opt(300.0, "Nothing in order from the controller for this long while the host kept asking: the link is lost or out of step; reconnect.", minval=20.0, maxval=60_000.0)
    reconnect_ms: float = opt(200.0, "Wait between attempts to reopen a lost port.", minval=10.0, maxval=60_000.0)
    connect_timeout_s: float = opt(5.0, "How long startup waits for the controller to answer and synchronise.", minval=0.1, maxval=120.0)

    def __post_init__(self) -> None:
        problems = check_pins("valves", self.pins, JET_BINS, 255)
        if self.heartbeat_ms * 3 > self.silence_ms:
            problems.append(f"valves.heartbeat_ms = {self.heartbeat_ms} must be at most a third of "
                            f"valves.silence_ms = {self.silence_ms} (one lost heartbeat must not trip the watchdog)")
        if self.link_timeout_ms < self.sync_interval_ms * 3:
            problems.append(f"valves.link_timeout_ms = {self.link_timeout_ms} must be at least three times "
                            f"valves.sync_interval_ms = {self.sync_interval_ms} (the controller's answers to "
                            "clock queries show the link is alive)")
        if problems:
            raise ConfigError(problems)

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        margin_ms = sections["ejection"].margin_ms
        problems = pulse_limits(self, sections)
        if self.max_sync_error_us + self.late_limit_us > margin_ms * 1000:
            problems.append(f"valves.max_sync_error_us + valves.late_limit_us = {self.max_sync_error_us} + "
                            f"{self.late_limit_us} us is above ejection.margin_ms = {margin_ms} ms: a pulse off by "
                            "both would miss the start of the stone's passage; lower them or raise ejection.margin_ms")
        return problems


def open_mcu_valves(cfg: McuValvesConfig, opening: Opening, port: str | None = None, *,
                    truth: ClockTruth | None = None, on_close: list[Callable[[], None]] | None = None) -> McuValves:
    """The controller on `port` (default: valves.port), connected and synchronised.

    The `mcu` lights' strobes are configured as extra outputs of the same controller."""
    from sorterd.controller.mcu import McuValves
    from sorterd.parts.lights.pulsed import McuLightsConfig

    if opening.clock.virtual:
        raise ValueError("valves.type = 'mcu' talks to real-time firmware: it needs the wall clock, "
                         "not the virtual one (sim.clock = 'wall')")
    lights = opening.cfg.lights
    extra = lights.outputs() if isinstance(lights, McuLightsConfig) else {}
    valves = McuValves(cfg, opening.clock, port or cfg.port, truth=truth, on_close=on_close, extra_outputs=extra)
    try:
        valves.start_blocking(cfg.connect_timeout_s)  # startup: nothing else runs yet
    except BaseException:
        valves.close()
        raise
    return valves


BACKEND = Backend("valves", "mcu", McuValvesConfig, open_mcu_valves)
