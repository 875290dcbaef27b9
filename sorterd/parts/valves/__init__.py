"""Valves: pulses with absolute host times, fired by something that is not asyncio.

Backends (`[valves] type`):
  * `sim`    ideal hardware-timed valves in the simulated machine;
  * `dry`    plan and log pulses, drive nothing (replay, commissioning);
  * `mcu`    the valve-controller firmware (hw/) over serial: the host converts
             each pulse to the controller's clock (continuous clock sync), the
             controller fires it from a hardware timer and owns the fail-safe
             (max on-time, all off when the host goes silent) -- the production
             path (`parts/valves/mcu.py`, the link in `controller/mcu.py`);
  * `gpio`   GPIO lines (`library` = gpiod or jetson) driven by one real-time
             thread on the host (`parts/valves/gpio.py`, the thread in
             `controller/gpio.py`) -- no fail-safe against a crashed process.

`schedule` either accepts a pulse (it will fire at its time) or refuses it
(its start is too close or past, the controller is not reachable or not
synchronised: never fire late, never queue blind).  `outcome` reports what
actually happened: fired (with the actual on/off instants, as reported by
the device, never the scheduled ones), refused, cancelled, or unknown (the
link to the controller was lost before it reported).

Backends with timing figures return them from `stats()` (the summary and the
Prometheus collector read it); the others return None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sorterd.configfile import opt
from sorterd.controller.outputs import Pulse, PulseOutcome, ValveStats


@dataclass(frozen=True)
class ValveOptions:
    """What every `[valves]` backend's options declare (the rig and the cross-checks read them)."""

    type: str = opt("", "Backend.")

    @property
    def connect_timeout_s(self) -> float:
        """How long opening the backend may take (waiting for a controller); 0 = at once."""
        return 0.0

    @property
    def wall_clock(self) -> bool:
        """The backend drives real valves on real time."""
        return True

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        """Problems of this backend with the other sections (all built); none by default."""
        return []


class Valves(Protocol):
    """What the pipeline, the pulsed lights, calibration, the summary and the metrics use of the valves."""

    def schedule(self, pulse: Pulse) -> str | None:
        """Queue a pulse; None if accepted, else the reason it was refused."""
        ...

    def cancel(self, pulse: Pulse) -> bool:
        """Withdraw a queued pulse; True if it will not fire."""
        ...

    async def outcome(self, pulse: Pulse) -> PulseOutcome: ...

    def stats(self) -> ValveStats | None:
        """Device-stamped timing and faults (a snapshot, read from any thread); None: not measured."""
        ...

    def close(self) -> None:
        """All valves off, now and on every exit path."""
        ...
