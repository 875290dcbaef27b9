"""No jet may catch a second stone: the neighbour and cancel rules (loop thread only).

A decided stone keeps its decision (`bin`, what the classifier and §8.2 say it
is); these rules choose its *route*, where the machine sends it.  When a stone
is decided, the stones already planned are checked against it:

* A planned jet that would catch the new stone on its way down is cancelled:
  that neighbour takes the default trajectory (route REJECT, reason "neighbour
  conflict"; no new pulse is planned that late) and the conflict is counted.
* A new stone bound for a jet whose pulse would also catch a neighbour's
  passage is not blown there: it takes `machine.safe_route` if that is SELECT
  and the SELECT jet catches nobody, else the default trajectory (REJECT);
  "neighbour conflict", counted.  A stone whose own jet is clear keeps it: a
  cancelled neighbour falls past untouched.  So two stones bound for the same
  nozzle both fall (their jets would catch each other); the second of two
  bound for different nozzles is still sorted when its jet is clear.
* A jet that cannot be cancelled any more (already sent, or the valves refuse)
  may carry the new stone into that jet's bin: the new stone gets no jet of its
  own (route REJECT, every jet it falls past is cancelled where it still can
  be), is flagged, its reason names the bin of the first such jet it meets, and
  it is counted as a co-deflection risk.

Why cancel rather than let the first stone keep its pulse and its neighbour be
carried along (§8.2 costs): a stone blown into a sorted bin it was not decided
for is contamination nobody can find again (FLIP -> CUT costs 7, CUT -> FLIP
10), while a stone in REJECT has its row (decided `bin`, route REJECT, the
reason) and is recoverable when REJECT is re-checked (CUT -> REJECT: "may be
recoverable").  With `machine.safe_route = "SELECT"` the new stone is sent for
review instead where that is safe (CUT -> SELECT costs 3, not 8).

The planner (`sorting/eject.py`) predicts passages; this module decides what
to do about overlaps and touches the valves only through `cancel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

from sorterd.controller.outputs import Pulse
from sorterd.domain import JET_BINS
from sorterd.sorting.decide import Decision
from sorterd.sorting.eject import Planner, plan_pulse
from sorterd.sorting.record import StoneRow
from sorterd.sorting.stats import RunCounter
from sorterd.sorting.track import Track

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A decided stone whose pulse has not resolved yet."""

    row: StoneRow
    pulse: Pulse | None


class Cancels(Protocol):
    """What the neighbour rules need of the valves."""

    def cancel(self, pulse: Pulse) -> bool:
        """Withdraw a scheduled pulse; False when it can no longer be withdrawn."""
        ...


@dataclass(frozen=True)
class Routed:
    """A decided stone after the neighbour rules."""

    decision: Decision  # its bin is the decided one; reason and flag say why the route differs
    route: str  # where the machine sends it: the decided bin, the safe route, or REJECT (no jet)


class Neighbours:
    """Applies the rules above to each newly decided stone (loop thread only).

    `pending` is the pipeline's own table of stones whose pulses are scheduled
    and unresolved (shared, not copied): a cancelled neighbour's row is
    rewritten in it (its route, not its decided bin), so it is recorded as the
    machine routed it.
    """

    def __init__(self, planner: Planner, pending: dict[str, Pending], valves: Cancels, count: RunCounter,
                 safe_route: str = "REJECT") -> None:
        self.planner = planner
        self.pending = pending
        self.valves = valves
        self.count = count
        self.safe_route = safe_route

    def resolve(self, track: Track, dec: Decision) -> Routed:
        """The route for the new stone `track` decided `dec`, after its neighbours are dealt with."""
        self.planner.add(track)
        caught = self._caught_by_jet(track, dec.bin) if dec.bin in JET_BINS else []
        route = self._conflict_route(track) if caught else dec.bin
        tried = self.planner.caught_by(track, route)
        stuck = self._cancel_jets(tried, track.stone_id)
        if stuck and route != "REJECT":
            # It may be carried already: no jet of its own, and it now falls past every nozzle.
            route = "REJECT"
            stuck += self._cancel_jets([s for s in self.planner.caught_by(track, route) if s not in tried],
                                       track.stone_id)
        if not stuck and caught:
            self.count.conflict()
            return Routed(replace(dec, reason=f"neighbour conflict: its jet into {dec.bin} would also catch {caught[0]}"),
                          route)
        if not stuck:
            return Routed(dec, route)
        # Too late to cancel: that jet may carry this stone into its bin (how much of the
        # stone it catches decides).  Its record says so and flags it for a look in that
        # bin, rather than claim it went where it was routed.
        into = min(stuck, key=lambda b: self.planner.geometry.nozzle_drop_mm[b])  # the first jet it meets
        self.count.co_deflection_risk(track.stone_id, into)
        log.warning("%s: a neighbour's jet into %s could not be cancelled and may carry it", track.stone_id, into)
        return Routed(replace(dec, flagged=True, reason=f"co-deflection risk: a neighbour's jet into {into} "
                                                        f"could not be cancelled"), route)

    def _caught_by_jet(self, track: Track, bin_name: str) -> list[str]:
        """The neighbours a jet into bin_name for this stone would also catch."""
        return self.planner.conflicts(plan_pulse(track, bin_name, self.planner.geometry, self.planner.ejection))

    def _conflict_route(self, track: Track) -> str:
        """The safe route when its jet is clear too; otherwise the default trajectory."""
        if self.safe_route in JET_BINS and not self._caught_by_jet(track, self.safe_route):
            return self.safe_route
        return "REJECT"

    def _cancel_jets(self, others: list[str], caught: str) -> list[str]:
        """Cancel the planned jets of `others`, which would catch stone `caught`; the valves
        of those that could not be cancelled."""
        return [valve for other in others if (valve := self._cancel_for_conflict(other, caught)) is not None]

    def _cancel_for_conflict(self, sid: str, caught: str) -> str | None:
        """Cancel a neighbour's pulse; the valve it will still fire on if it cannot be."""
        pend = self.pending.get(sid)
        if pend is None or pend.pulse is None:
            pulse = self.planner.pulses.get(sid)  # already resolved: fired (or firing) as planned
            return pulse.valve if pulse is not None else None
        if self.valves.cancel(pend.pulse):
            self.planner.pulses.pop(sid, None)
            pend.row.reason = f"neighbour conflict: its jet into {pend.pulse.valve} would also catch {caught}"
            pend.row.route = "REJECT"  # its decided bin stays in row.bin
            self.count.conflict()
            return None
        log.warning("%s: pulse could not be cancelled; a neighbour will be co-deflected", sid)
        return pend.pulse.valve
