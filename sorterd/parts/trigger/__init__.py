"""Triggers: 'a stone is entering the imaging zone'.

Backends (`[trigger] type`): `sim` (a break-beam in the simulated machine),
`beam` (a break-beam sensor's edge on GPIO, kernel-timestamped with gpiod:
`trigger/beam.py`), `vision` (backlit previews of the entry zone against the
reference: `trigger/vision.py`), `replay` (a recorded session's pairs).  Each
event carries the host time of the edge itself, not of when Python noticed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TriggerEvent:
    t_ns: int  # the edge, host monotonic ns


class Trigger(Protocol):
    """What the pipeline and calibration use of a trigger."""

    async def next(self) -> TriggerEvent | None:
        """The next edge, or None when the source is exhausted (end of a simulated run)."""
        ...

    def set_reference(self, backlit: np.ndarray) -> None:
        """Today's empty channel under the backlight (calibration); a no-op for triggers that do not look."""
        ...

    def close(self) -> None: ...
