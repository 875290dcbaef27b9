"""Cameras: a frame pair per trigger, and the empty-channel reference frames.

Backends (chosen by `[camera] type`): `sim` (the simulated machine), `opencv`
(V4L2, GStreamer, files), `replay` (a recorded session).  Frame timestamps are
host monotonic ns of the exposure, converted from the camera's own clock
inside the backend.

One camera, two users: pair capture and the `vision` trigger's previews.  They
take turns through the camera's own `lock`; a pair always goes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sorterd.configfile import opt


@dataclass(frozen=True)
class CameraOptions:
    """What every `[camera]` backend's options declare: the callers outside the backend
    (pipeline, vision trigger, calibration) read only these."""

    type: str = opt("", "Backend.")
    reopen_backoff_ms: float = opt(500.0, "Wait between attempts to reopen a lost camera.", minval=10.0, maxval=60_000.0)

    @property
    def pixels_per_mm(self) -> float:
        """The configured image scale; 0.0 where the source brings its own (a replayed session)."""
        return 0.0

    @property
    def wall_clock(self) -> bool:
        """The backend runs on real time (a device), so the run cannot use the virtual clock."""
        return True

    def with_reference_dir(self, path: str) -> CameraOptions:
        """These options with today's reference frames from calibration, for a camera that
        loads them from a folder and names none itself; unchanged for any other."""
        return self

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        """Problems of this backend with the other sections (all built); none by default."""
        return []


class CameraError(RuntimeError):
    """The camera failed (disconnected, timed out); stones in the gap take the safe route."""


class RecordedFrameError(CameraError):
    """A recorded frame that cannot be read (replay): its pair is skipped and counted as
    unreadable; the camera did not fail and no trigger was lost."""


@dataclass(frozen=True)
class RecordedPair:
    """Where a replayed frame comes from: its pair's name and the next pair's, which
    bound the ids its stones were recorded under (`data.session.pair_stone_ids`)."""

    name: str
    next_name: str | None


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # H x W x 3 uint8, BGR
    t_ns: int  # exposure instant, host monotonic ns
    mode: str
    recorded: RecordedPair | None = None  # replay: the recorded pair (its stones keep their ids)


@dataclass(frozen=True)
class FramePair:
    seq: int
    trigger_ns: int
    backlit: Frame
    toplit: Frame
    # The lights' reports for this pair (sorterd.parts.lights.StrobeResult list), and the
    # instant everything had to be dark; None for sources without strobes (replay).
    strobes: Awaitable[list[Any]] | None = None
    dark_ns: int = 0


class Camera(Protocol):
    """What the pipeline, the vision trigger and calibration use of a camera; every backend declares each member."""

    pixels_per_mm: float  # image scale of its frames
    prelit: bool  # its frames were lit when they were recorded (replay): capture strobes nothing
    exposure_at_strobe: bool  # frame timestamps are the exposure instants the strobes were timed for
    pair_interval_ms: float | None  # the interval its pairs were taken at (replay); None: lights.pair_interval_ms
    lock: asyncio.Lock  # held by whoever exposes frames on it (pair capture, vision previews), one at a time

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
