"""Strobe lights: backlight and ring light.

Backends (`[lights] type`): `sim`.  Later: `gpio`, `mcu` (controller strobe
outputs).  A backend records when each light was actually on, so the frame
pair's lighting can be audited (§2.2: both lights off by t0 + 20 ms).
"""

from __future__ import annotations

from typing import Protocol


class Lights(Protocol):
    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> None:
        """Light for `mode` on over [t_on_ns, t_off_ns) (host time)."""
        ...

    def all_off(self) -> None: ...
