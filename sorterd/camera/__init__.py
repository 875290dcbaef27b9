"""Cameras: a frame pair per trigger, and the empty-channel reference frames.

Backends (chosen by `[camera] type`): `sim` (the simulated machine).  Later:
`opencv` (V4L2/GStreamer) and `replay`.  Frame timestamps are host monotonic
ns of the exposure, converted from the camera's own clock inside the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

MODES = ("backlit", "toplit")


class CameraError(RuntimeError):
    """The camera failed (disconnected, timed out); stones in the gap take the safe route."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # H x W x 3 uint8, BGR
    t_ns: int  # exposure instant, host monotonic ns
    mode: str


@dataclass(frozen=True)
class FramePair:
    seq: int
    trigger_ns: int
    backlit: Frame
    toplit: Frame
    # Backend extras; the simulator puts ground truth here for the run summary.
    # The pipeline never reads it.
    meta: dict[str, Any] = field(default_factory=dict)


class Camera(Protocol):
    pixels_per_mm: float

    def reference(self, mode: str) -> np.ndarray:
        """The empty channel in that lighting mode (segmentation background)."""
        ...

    async def grab(self, mode: str, t_ns: int) -> Frame:
        """Expose one frame at host time t_ns (already strobed by the lights); CameraError on failure."""
        ...

    def reopen(self) -> None:
        """Try to get a lost camera back; CameraError while it is still gone."""
        ...

    def close(self) -> None: ...
