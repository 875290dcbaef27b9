"""Bounded latency and timing-error samples for a daemon that runs for days.

A `Samples` series keeps its values exactly up to `exact_cap` of them (every
normal run, and every test, reports the same exact percentiles as a list
would), then folds them into a histogram of log-spaced buckets and counts
from there on.  Memory is bounded by constants, never by the stone count:
`exact_cap` floats, then at most `2 * ln(max/floor) / ln(GROWTH)` buckets
(about 6,000 for nanoseconds to hours), plus the last `recent` values for the
progress line.

Error bound once folded: a quantile is the bucket holding the sample of that
rank, reported as the bucket's midpoint, so it is within `REL_ERROR` (0.5 %)
of that order statistic; |values| below `floor` share one bucket reported as
0 (an absolute error below `floor`).  numpy's linear interpolation between the
two neighbouring order statistics is not reproduced: at that scale it moves a
p99 over thousands of samples by less than the bucket width anyway.

Why not a reservoir: a uniform reservoir's p99 from k samples is off by
~sqrt(0.01 k) ranks (a 10 % rank error at k = 10,000), and it forgets a
burst of late stones, which is what a p99 is read for; the histogram keeps
every sample's rank and bounds the value error instead.

Threads: one owner per series (the thread that appends), as for the deques
it replaces.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterator

import numpy as np

GROWTH = 1.01  # bucket upper / lower edge
REL_ERROR = (GROWTH - 1) / 2  # 0.5 %: a bucket's midpoint vs any value in it, relative to that value
EXACT_CAP = 10_000  # values kept exactly before folding into the histogram
RECENT = 512  # last values kept for "recent" figures (the progress line, the unseen warning)


class Samples:
    """A series of float or int samples with bounded memory (see the module docstring)."""

    def __init__(self, floor: float, exact_cap: int | None = None, recent: int = RECENT) -> None:
        exact_cap = EXACT_CAP if exact_cap is None else exact_cap
        if floor <= 0 or exact_cap < 1 or recent < 0:
            raise ValueError(f"Samples(floor={floor}, exact_cap={exact_cap}, recent={recent}): "
                             "floor > 0, exact_cap >= 1 and recent >= 0 are allowed")
        self.floor = float(floor)
        self.exact_cap = exact_cap
        self._exact: array[float] | None = array("d")
        self._buckets: dict[int, int] = {}  # signed bucket index -> count (0: |v| < floor)
        self._recent: deque[float] = deque(maxlen=recent)
        self.count = 0
        self.max_abs = 0.0

    def append(self, value: float) -> None:
        v = float(value)
        self.count += 1
        self.max_abs = max(self.max_abs, abs(v))
        self._recent.append(v)
        if self._exact is not None:
            self._exact.append(v)
            if len(self._exact) > self.exact_cap:
                self._fold()
        else:
            self._bucket(v)

    def extend(self, values: Iterator[float] | tuple[float, ...] | list[float]) -> None:
        for v in values:
            self.append(v)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[float]:
        """The exact values (all of them, while the series is exact; else the recent ones)."""
        return iter(self._exact if self._exact is not None else self._recent)

    @property
    def exact(self) -> bool:
        return self._exact is not None

    def exact_array(self) -> np.ndarray | None:
        """Every value, in order, while the series is still exact; None once folded."""
        return None if self._exact is None else np.frombuffer(self._exact, dtype=float).copy()

    def recent(self, n: int) -> list[float]:
        """The last n values (at most `recent` of them), newest first."""
        return list(reversed(self._recent))[:n]

    def quantile(self, q: float, absolute: bool = False) -> float:
        """The q-quantile (0..1) of the values (of |value| with absolute); nan when empty."""
        if not self.count:
            return float("nan")
        a = self.exact_array()
        if a is not None:
            return float(np.percentile(np.abs(a) if absolute else a, q * 100))
        counts: dict[int, int] = {}
        for k, n in self._buckets.items():
            key = abs(k) if absolute else k
            counts[key] = counts.get(key, 0) + n
        rank = q * (self.count - 1)  # numpy's: the order statistic at that (fractional) rank
        seen = 0
        for k in sorted(counts):
            seen += counts[k]
            if seen > rank:
                return self._value(k)
        return self._value(max(counts))

    # -- the histogram --------------------------------------------------------

    def _fold(self) -> None:
        assert self._exact is not None
        for v in self._exact:
            self._bucket(v)
        self._exact = None

    def _bucket(self, v: float) -> None:
        m = abs(v)
        k = 0 if m < self.floor else int(math.floor(math.log(m / self.floor) / math.log(GROWTH))) + 1
        key = k if v >= 0 else -k
        self._buckets[key] = self._buckets.get(key, 0) + 1

    def _value(self, key: int) -> float:
        """A bucket's midpoint: bucket k > 0 holds |v| in [floor g^(k-1), floor g^k)."""
        if key == 0:
            return 0.0
        k = abs(key)
        mid = self.floor * GROWTH ** (k - 1) * (1 + GROWTH) / 2
        return mid if key > 0 else -mid
