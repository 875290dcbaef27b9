"""No jet may catch a second stone: the neighbour and cancel rules (loop thread only).

When a stone is decided, the stones already planned are checked against it:

* A planned jet that would catch the new stone on its way down is cancelled;
  the neighbour it was for takes the default trajectory (REJECT, "neighbour
  conflict") and the conflict is counted.
* A jet that cannot be cancelled any more (already sent, or the valves refuse)
  may carry the new stone into that jet's bin: the new stone is routed REJECT,
  flagged, its reason names the bin (the first such jet it meets), and it is
  counted as a co-deflection risk.
* A new stone bound for a jet whose pulse would also catch a neighbour's
  passage is not blown: it takes REJECT ("neighbour conflict"), counted.

The planner (`sorting/eject.py`) predicts passages; this module decides what
to do about overlaps and touches the valves only through `cancel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


class Neighbours:
    """Applies the rules above to each newly decided stone (loop thread only).

    `pending` is the pipeline's own table of stones whose pulses are scheduled
    and unresolved (shared, not copied): a cancelled neighbour's row is
    rewritten in it, so it is recorded as the machine routed it.
    """

    def __init__(self, planner: Planner, pending: dict[str, Pending], valves: Cancels, count: RunCounter) -> None:
        self.planner = planner
        self.pending = pending
        self.valves = valves
        self.count = count

    def resolve(self, track: Track, dec: Decision) -> Decision:
        """The decision for the new stone `track`, after its neighbours are dealt with."""
        self.planner.add(track)
        stuck = [valve for other in self.planner.caught_by(track, dec.bin)
                 if (valve := self._cancel_for_conflict(other)) is not None]
        if stuck:
            # Too late to cancel: that jet may carry this stone into its bin (how much of the
            # stone it catches decides).  Its record says so and flags it for a look in that
            # bin, rather than claim it went where it was decided.
            into = min(stuck, key=lambda b: self.planner.geometry.nozzle_drop_mm[b])  # the first jet it meets
            self.count.co_deflection_risk(track.stone_id, into)
            log.warning("%s: a neighbour's jet into %s could not be cancelled and may carry it", track.stone_id, into)
            return Decision("REJECT", dec.color, dec.clarity, dec.confidence, True,
                            f"co-deflection risk: a neighbour's jet into {into} could not be cancelled "
                            f"(was {dec.bin})")
        if dec.bin not in JET_BINS:
            return dec
        probe = plan_pulse(track, dec.bin, self.planner.geometry, self.planner.ejection)
        if self.planner.conflicts(probe):
            self.count.conflict()
            return Decision("REJECT", dec.color, dec.clarity, dec.confidence, dec.flagged,
                            f"neighbour conflict (was {dec.bin})")
        return dec

    def _cancel_for_conflict(self, sid: str) -> str | None:
        """Cancel a neighbour's pulse; the valve it will still fire on if it cannot be."""
        pend = self.pending.get(sid)
        if pend is None or pend.pulse is None:
            pulse = self.planner.pulses.get(sid)  # already resolved: fired (or firing) as planned
            return pulse.valve if pulse is not None else None
        if self.valves.cancel(pend.pulse):
            self.planner.pulses.pop(sid, None)
            pend.row.reason = f"neighbour conflict (was {pend.row.bin})"
            pend.row.bin = pend.row.route = "REJECT"
            self.count.conflict()
            return None
        log.warning("%s: pulse could not be cancelled; a neighbour will be co-deflected", sid)
        return pend.pulse.valve
