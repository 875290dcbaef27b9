"""Triggers: 'a stone is entering the imaging zone'.

Backends (`[trigger] type`): `sim` (a break-beam in the simulated machine),
`beam` (a break-beam sensor's edge on GPIO, kernel-timestamped with gpiod:
`trigger/beam.py`), `vision` (backlit previews of the entry zone against the
reference: `trigger/vision.py`), `replay` (a recorded session's pairs).  Each
event carries the host time of the edge itself, not of when Python noticed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sorterd.configfile import opt

# How late after a stone's front crosses its place a trigger's edge may be stamped: a
# callback's latency.
CALLBACK_SLACK_NS = 1_000_000


@dataclass(frozen=True)
class TriggerOptions:
    """What every `[trigger]` backend's options declare: where a stone is when its trigger
    fires and how late the edge may be stamped (the pipeline's trigger ledger reads them)."""

    type: str = opt("", "Backend.")

    @property
    def front_mm(self) -> float | None:
        """Where a stone's front is, from the view's left edge, when its trigger fires
        (None: not tied to a place, as for replayed pairs)."""
        return None

    @property
    def slack_ns(self) -> int:
        """How late after the front's crossing the trigger may stamp its edge."""
        return CALLBACK_SLACK_NS

    @property
    def wall_clock(self) -> bool:
        """The backend watches a real sensor on real time."""
        return True

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        """Problems of this backend with the other sections (all built); none by default."""
        return []


@dataclass(frozen=True)
class TriggerEvent:
    t_ns: int  # the edge, host monotonic ns
    # The stone's front crossed the trigger's place no earlier than this: a trigger that only
    # looks now and then (vision: previews, delayed while a pair holds the camera) stamps the
    # instant it saw the stone, which can be well after the crossing.  None: at t_ns, within
    # the trigger's slack_ns.
    earliest_ns: int | None = None


class Trigger(Protocol):
    """What the pipeline and calibration use of a trigger."""

    async def next(self) -> TriggerEvent | None:
        """The next edge, or None when the source is exhausted (end of a simulated run)."""
        ...

    def set_reference(self, backlit: np.ndarray) -> None:
        """Today's empty channel under the backlight (calibration); a no-op for triggers that do not look."""
        ...

    def close(self) -> None: ...
