"""Tracking: a stone is in view for several captures; it is decided once.

`Track` is what the planner needs to predict a stone's passages (its position,
speed and length at one observed instant).  `Tracker` keeps the recent tracks
(event-loop thread only); the segmentation worker gets an immutable snapshot
and asks `is_known` whether an object it found is one of them, seen again at
its predicted position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from sorterd.sorting.segment import Seen

# A stone found at rest where a decided one could be is that stone when their areas
# agree this closely (the mask of one stone varies by a few per cent between frames).
STOPPED_AREA_RATIO = 1.5
# ... and their pictures this closely (normalised correlation of `segment.look`): the same
# stone lying still correlates ~0.99 with itself under sensor noise; another stone put
# down on the same spot (tweezers, one stone at a time) has other facets: <= 0.75 in tests/test_still.py.
STOPPED_LOOK_CORRELATION = 0.9


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
    area_mm2: float = 0.0  # its toplit area, to recognise it if it stops (0 = not compared)
    look: np.ndarray | None = field(default=None, repr=False, compare=False)  # segment.look (None = not compared)


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


def is_known(seen: Seen, t_ns: int, known: Known, tolerance_mm: float, still_mm_s: float) -> bool:
    """Is `seen`, at t_ns, a stone that was already decided?

    Yes when it is where a decided stone's track predicts.  Also when it is not
    moving (its own pair measured less than `still_mm_s`, or no speed) and lies
    anywhere between where a decided stone was seen and where its track predicts,
    at that stone's y, area and look: a stone that stopped in view (or never moved) is
    still one stone, decided once.  A moving object is never matched that way,
    so the stones following a stopped one are decided as new.
    """
    at_rest = seen.speed_mm_s is None or abs(seen.speed_mm_s) < still_mm_s
    for tr, y in known:
        if abs(y - seen.y_mm) >= 1.0:
            continue
        predicted = tr.x_mm + tr.speed_mm_s * (t_ns - tr.t_obs_ns) * 1e-9
        if at_rest:
            # Where it was predicted is no proof for an object at rest: a stone decided at
            # rest is predicted where the next one may be put down.  It must look the same.
            if _stopped_here(tr, predicted, seen, tolerance_mm):
                return True
        elif abs(predicted - seen.x_mm) < tolerance_mm:
            return True
    return False


def _stopped_here(tr: Track, predicted: float, seen: Seen, tolerance_mm: float) -> bool:
    lo, hi = min(tr.x_mm, predicted) - tolerance_mm, max(tr.x_mm, predicted) + tolerance_mm
    if not lo <= seen.x_mm <= hi:
        return False
    if tr.area_mm2 <= 0 or seen.area_mm2 <= 0:
        return True
    ratio = max(tr.area_mm2, seen.area_mm2) / min(tr.area_mm2, seen.area_mm2)
    if ratio >= STOPPED_AREA_RATIO:
        return False
    if tr.look is None or seen.patch is None:
        return True
    return float(np.dot(tr.look, seen.patch)) > STOPPED_LOOK_CORRELATION
