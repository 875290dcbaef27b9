"""Trigger ledger: every stone the trigger counted is accounted for by a decision.

A trigger edge says a stone's front crossed a known place (the beam, or the
vision trigger's entry zone) at a known instant.  Every decided object says,
from its position and speed in the frames, when its front crossed that place
(or will).  An edge that no decided object explains, once no later pair could
still explain it, is a stone that passed the camera unseen: no record, no
pulse, the default trajectory (REJECT).  Counting those is how an overloaded
or misconfigured machine shows that it is losing sight of stones, instead of
silently sorting fewer.

The converse -- a decided object whose crossing no edge explains -- is a stone
the trigger missed (a small stone under a badly aligned beam); it is counted
too.  A decision may come before its stone's edge (a stone fully in view before
its front reaches the beam is decided from the previous stone's pair) or after
it, so both sides wait up to `horizon_ns` for their match.

Touching stones break the beam once.  A decided stone with no edge of its own
is explained by its touching neighbour's edge, or by the edge of a touching
stone ahead that the camera missed -- but only once the horizon has passed,
when every decision that could claim those edges is in: decisions come in any
order (the rear of two touching stones is often decided first), and a rule
applied on arrival let the rear stone take the pair's one edge, leaving the
front stone to take an older edge or none (a stone counted unseen, or
untriggered, that never was).  An edge therefore stays open `reach` (the
longest single stone's passage plus tolerance) longer than the horizon.

`settle` is given the instant up to which every frame pair has been decided
(the pipeline passes the exposure of the pair it has just processed, not the
clock), so a slow pipeline delays the books but never closes them early.

Loop thread only.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass


@dataclass
class LedgerCounts:
    edges: int = 0
    explained: int = 0
    passed_unseen: int = 0  # edges no decided object explained
    untriggered: int = 0  # decided objects no edge explained


@dataclass
class _Expected:
    first_ns: int
    last_ns: int
    span_ns: int  # its own length passing the place
    tol_ns: int  # how far its edge may be from the computed crossing
    matched: int = 0
    behind_ns: int = 0  # how far behind a missed touching stone's edge it may be


class TriggerLedger:
    def __init__(self, tolerance_ns: int, horizon_ns: int) -> None:
        self.tolerance_ns = tolerance_ns  # unless a decision brings its own
        self.horizon_ns = horizon_ns
        self.counts = LedgerCounts()
        self._edges: list[int] = []  # unexplained edge times, sorted
        self._earliest: dict[int, int] = {}  # edge time -> earliest crossing, where a trigger gave one
        self._max_late_ns = 0  # the most any edge came after its earliest crossing
        self._expected: list[_Expected] = []  # decided objects still waiting for (more) edges
        self._explained: list[_Expected] = []  # decided objects with their edge, kept for the horizon
        self._reach_ns = 0  # how long after an edge a decision may still claim it (behind + tolerance)

    def edge(self, t_ns: int, earliest_ns: int | None = None) -> None:
        """A trigger edge (every one the source gave, queued or not).  earliest_ns: the
        stone crossed no earlier than this (a trigger that saw it late); None: at t_ns."""
        self.counts.edges += 1
        earliest = t_ns if earliest_ns is None else min(earliest_ns, t_ns)
        near = [e for e in self._expected if e.first_ns - e.tol_ns <= t_ns and earliest <= e.last_ns + e.tol_ns]
        if not near:
            insort(self._edges, t_ns)
            if earliest < t_ns:
                self._earliest[t_ns] = earliest
                self._max_late_ns = max(self._max_late_ns, t_ns - earliest)
            return
        e = min(near, key=lambda e: (e.matched, _gap(earliest, t_ns, e.first_ns), abs(e.first_ns - t_ns)))
        e.matched += 1
        self.counts.explained += 1
        if e.last_ns == e.first_ns:  # one stone, one edge
            self._expected.remove(e)
            self._explained.append(e)

    def decided(self, first_ns: int, last_ns: int | None = None, span_ns: int = 0, tol_ns: int | None = None,
                behind_ns: int = 0) -> None:
        """A decided object whose front crossed the trigger's place at first_ns, its own
        length taking span_ns to pass.  A single stone explains the one edge nearest
        first_ns; a cluster (stones one behind the other) keeps crossing until last_ns,
        and every edge in that span is its own.

        behind_ns: how long the longest single stone takes to pass.  A stone that crossed
        with no edge of its own, while an unexplained edge came up to that long before
        it, was touching a stone the camera missed: the beam broke once for both."""
        last = first_ns if last_ns is None else max(first_ns, last_ns)
        tol = self.tolerance_ns if tol_ns is None else tol_ns
        lo = bisect_left(self._edges, first_ns - tol)
        hi = bisect_right(self._edges, last + tol + self._max_late_ns)
        mine = [i for i in range(lo, hi) if self._earliest.get(self._edges[i], self._edges[i]) - tol <= last]
        if last == first_ns and mine:
            mine = [min(mine, key=lambda i: self._distance(i, first_ns))]
        if behind_ns:  # it may claim an edge this far back when it is settled
            self._reach_ns = max(self._reach_ns, behind_ns + tol)
        e = _Expected(first_ns, last, span_ns, tol, len(mine), behind_ns)
        self.counts.explained += e.matched
        for i in reversed(mine):
            self._drop_edge(i)
        if e.matched == 0 or last != first_ns:  # its edge may come yet; a cluster may have more
            self._expected.append(e)
        else:
            self._explained.append(e)

    def _drop_edge(self, i: int) -> None:
        """Edge i is explained; its span goes with the last edge of that instant (a vision
        trigger gives one edge per stone that entered, all at the preview's instant)."""
        t = self._edges.pop(i)
        j = bisect_left(self._edges, t)
        if j == len(self._edges) or self._edges[j] != t:
            self._earliest.pop(t, None)

    def _distance(self, i: int, t_ns: int) -> tuple[int, int]:
        """How far edge i is from a crossing at t_ns: from its span of possible crossings,
        then from the edge itself."""
        t = self._edges[i]
        return _gap(self._earliest.get(t, t), t, t_ns), abs(t - t_ns)

    def settle(self, now_ns: int) -> list[int]:
        """Close the books on everything older than the horizon; returns the edge times of
        the stones newly found to have passed unseen."""
        cutoff = now_ns - self.horizon_ns
        keep = []
        for e in sorted(self._expected, key=lambda e: e.first_ns):
            if e.last_ns >= cutoff:
                keep.append(e)
            elif e.matched or self._shares_an_edge(e) or self._takes_a_missed_stones_edge(e):
                self._explained.append(e)
            else:
                self.counts.untriggered += 1
        self._expected = keep
        # A decision not settled yet may still claim an edge up to `reach` before its crossing.
        n = bisect_left(self._edges, cutoff - self._reach_ns)
        unseen = self._edges[:n]
        del self._edges[:n]
        for t in unseen:
            self._earliest.pop(t, None)
        self.counts.passed_unseen += n
        self._explained = [e for e in self._explained if e.first_ns + e.span_ns >= cutoff - self.horizon_ns]
        return unseen

    def _shares_an_edge(self, e: _Expected) -> bool:
        """A stone touching the one ahead of it crosses as that one's rear does: the beam
        never cleared between them, so one edge stands for both (whichever of the two
        took it)."""
        with_edges = self._explained + [a for a in self._expected if a.matched]
        return any(abs(a.first_ns + a.span_ns - e.first_ns) <= max(a.tol_ns, e.tol_ns)
                   or abs(e.first_ns + e.span_ns - a.first_ns) <= max(a.tol_ns, e.tol_ns) for a in with_edges)

    def _takes_a_missed_stones_edge(self, e: _Expected) -> bool:
        """A stone that crossed with no edge of its own, while an unexplained edge came up to
        `behind_ns` before it, was touching a stone the camera missed: the beam broke once
        for both.  It takes the latest such edge."""
        if not e.behind_ns:
            return False
        lo = bisect_left(self._edges, e.first_ns - e.tol_ns - e.behind_ns)
        hi = bisect_left(self._edges, e.first_ns - e.tol_ns)
        if hi == lo:
            return False
        self._drop_edge(hi - 1)
        self.counts.explained += 1
        e.matched = 1
        return True

    def close(self) -> list[int]:
        """End of input: nothing left can be explained any more."""
        return self.settle(2**62)


def _gap(earliest_ns: int, t_ns: int, crossing_ns: int) -> int:
    """How far a crossing is outside an edge's span [earliest_ns, t_ns] (0 inside)."""
    return max(0, earliest_ns - crossing_ns, crossing_ns - t_ns)
