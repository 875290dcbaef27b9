"""Tracking: a stone is in view for several captures; it is decided once.

`Track` is what the planner needs to predict a stone's passages (its position,
speed and length at one observed instant).  `Tracker` keeps the recent tracks
(event-loop thread only); the segmentation worker gets an immutable snapshot
and asks `is_known` whether an object it found is one of them, seen again at
its predicted position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Track:
    """Where a stone will be: enough to predict all its nozzle passages."""

    stone_id: str
    t_obs_ns: int
    x_mm: float
    speed_mm_s: float
    length_mm: float
    # Spread of several stones along the channel (a cluster): its members leave
    # the lip, and so pass every nozzle, spread_mm / speed apart.  0 = one stone.
    spread_mm: float = 0.0



Known = tuple[tuple[Track, float], ...]  # (track, y_mm) of the recently decided stones


class Tracker:
    """Recognises a stone seen again in a later capture (it is still in view).

    Owned by the loop thread; workers get an immutable `snapshot()`.
    """

    def __init__(self, tolerance_mm: float) -> None:
        self.tolerance_mm = tolerance_mm
        self.tracks: deque[tuple[Track, float]] = deque(maxlen=64)  # (track, y_mm)

    def add(self, track: Track, y_mm: float) -> None:
        self.tracks.append((track, y_mm))

    def snapshot(self) -> Known:
        return tuple(self.tracks)


def is_known(x_mm: float, y_mm: float, t_ns: int, known: Known, tolerance_mm: float) -> bool:
    """Is there, at (x_mm, y_mm) at t_ns, a stone that was already decided?"""
    for tr, y in known:
        predicted = tr.x_mm + tr.speed_mm_s * (t_ns - tr.t_obs_ns) * 1e-9
        if abs(predicted - x_mm) < tolerance_mm and abs(y - y_mm) < 1.0:
            return True
    return False
