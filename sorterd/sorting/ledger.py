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

Loop thread only.
"""

from __future__ import annotations

from bisect import bisect_left, insort
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


class TriggerLedger:
    def __init__(self, tolerance_ns: int, horizon_ns: int) -> None:
        self.tolerance_ns = tolerance_ns  # unless a decision brings its own
        self.horizon_ns = horizon_ns
        self.counts = LedgerCounts()
        self._edges: list[int] = []  # unexplained edge times, sorted
        self._expected: list[_Expected] = []  # decided objects still waiting for (more) edges
        self._explained: list[_Expected] = []  # decided objects with their edge, kept for the horizon
        self._last_edge_ns = -(2**62)

    def edge(self, t_ns: int) -> None:
        """A trigger edge (every one the source gave, queued or not)."""
        self.counts.edges += 1
        self._last_edge_ns = max(self._last_edge_ns, t_ns)
        near = [e for e in self._expected if e.first_ns - e.tol_ns <= t_ns <= e.last_ns + e.tol_ns]
        if not near:
            insort(self._edges, t_ns)
            return
        e = min(near, key=lambda e: (e.matched, abs(e.first_ns - t_ns)))
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
        hi = lo
        while hi < len(self._edges) and self._edges[hi] <= last + tol:
            hi += 1
        if last == first_ns and hi > lo:
            lo = min(range(lo, hi), key=lambda i: abs(self._edges[i] - first_ns))
            hi = lo + 1
        elif hi == lo and behind_ns and self._last_edge_ns > last + tol:  # its own edge should be in
            before = bisect_left(self._edges, first_ns - tol - behind_ns)
            if before < lo:
                lo, hi = lo - 1, lo  # the latest edge in that window: the touching stone's
        e = _Expected(first_ns, last, span_ns, tol, hi - lo)
        self.counts.explained += e.matched
        del self._edges[lo:hi]
        if e.matched == 0 or last != first_ns:  # its edge may come yet; a cluster may have more
            self._expected.append(e)
        else:
            self._explained.append(e)

    def settle(self, now_ns: int) -> list[int]:
        """Close the books on everything older than the horizon; returns the edge times of
        the stones newly found to have passed unseen."""
        cutoff = now_ns - self.horizon_ns
        n = bisect_left(self._edges, cutoff)
        unseen = self._edges[:n]
        del self._edges[:n]
        self.counts.passed_unseen += n
        keep = []
        for e in sorted(self._expected, key=lambda e: e.first_ns):
            if e.last_ns >= cutoff:
                keep.append(e)
            elif e.matched or self._shares_an_edge(e):
                self._explained.append(e)
            else:
                self.counts.untriggered += 1
        self._expected = keep
        self._explained = [e for e in self._explained if e.first_ns + e.span_ns >= cutoff - self.horizon_ns]
        return unseen

    def _shares_an_edge(self, e: _Expected) -> bool:
        """A stone touching the one ahead of it crosses as that one's rear does: the beam
        never cleared between them, so one edge stands for both."""
        return any(abs(a.first_ns + a.span_ns - e.first_ns) <= max(a.tol_ns, e.tol_ns) for a in self._explained)

    def close(self) -> list[int]:
        """End of input: nothing left can be explained any more."""
        return self.settle(2**62)
