"""Valves: pulses with absolute host times, fired by something that is not asyncio.

Backends (`[valves] type`): `sim` (ideal hardware-timed valves in the simulated
machine).  Later: `mcu` (controller firmware over serial), `jetson`, `gpiod`.

`schedule` either accepts a pulse (it will fire at its time) or refuses it
(its start is too close or past: never fire late).  `outcome` reports what
actually happened: fired (with the actual on/off instants, as reported by
the device, never the scheduled ones), refused, or cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sorterd.eject import Pulse


@dataclass(frozen=True)
class PulseOutcome:
    pulse: Pulse
    fired: bool
    actual_on_ns: int | None  # device-reported jet instants (host time)
    actual_off_ns: int | None
    status: str  # "fired", "refused: ...", "cancelled"


class Valves(Protocol):
    def schedule(self, pulse: Pulse) -> str | None:
        """Queue a pulse; None if accepted, else the reason it was refused."""
        ...

    def cancel(self, pulse: Pulse) -> bool:
        """Withdraw a queued pulse; True if it will not fire."""
        ...

    async def outcome(self, pulse: Pulse) -> PulseOutcome: ...

    def close(self) -> None:
        """All valves off, now and on every exit path."""
        ...
