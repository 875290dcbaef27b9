"""The neighbour and cancel rules: no jet catches a second stone, and when one may, the record says so."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sorterd import config
from sorterd.controller.outputs import Pulse
from sorterd.metrics import Metrics
from sorterd.sorting.decide import Decision
from sorterd.sorting.eject import Planner, plan_pulse
from sorterd.sorting.neighbours import Neighbours, Pending, Routed
from sorterd.sorting.record import StoneRow
from sorterd.sorting.stats import RunCounter
from sorterd.sorting.track import Track

MS = 1_000_000


@dataclass
class FakeValves:
    """Valves whose cancel succeeds or not, as told; they remember what was asked."""

    can_cancel: bool = True
    cancelled: list[Pulse] = field(default_factory=list)

    def cancel(self, pulse: Pulse) -> bool:
        self.cancelled.append(pulse)
        return self.can_cancel


@dataclass
class Rig:
    neighbours: Neighbours
    valves: FakeValves
    count: RunCounter

    @property
    def planner(self) -> Planner:
        return self.neighbours.planner

    def decide(self, track: Track, bin_name: str, flagged: bool = False) -> Routed:
        return self.neighbours.resolve(track, Decision(bin_name, "blue", "transparent", 0.93, flagged, "sorted"))

    def schedule(self, track: Track, routed: Routed) -> StoneRow:
        """What the pipeline does with a jet-bound route: plan, schedule, wait for the outcome."""
        pulse = plan_pulse(track, routed.route, self.planner.geometry, self.planner.ejection)
        row = row_for(track.stone_id, routed.decision.bin, pulse)
        self.planner.pulses[track.stone_id] = pulse
        self.neighbours.pending[track.stone_id] = Pending(row, pulse)
        return row


def row_for(sid: str, bin_name: str, pulse: Pulse | None) -> StoneRow:
    return StoneRow(
        stone_id=sid, capture_seq=0, t_trigger_ns=0, t_backlit_ns=0, t_toplit_ns=0, t_decided_ns=0,
        x_mm=20.0, y_mm=5.0, speed_mm_s=500.0, size_mm=2.5, length_mm=2.5, cluster=0,
        p_blue=0.9, p_light=0.05, p_inky=0.05, p_transparent=0.9, p_translucent=0.05, p_opaque=0.05,
        color="blue", clarity="transparent", confidence=0.9, bin=bin_name, route=bin_name, reason="sorted",
        flagged=0, deadline_miss=0, planned_on_ns=pulse.start_ns if pulse else None,
        planned_off_ns=pulse.end_ns if pulse else None, actual_on_ns=None, actual_off_ns=None,
        valve_status="scheduled", model_version="v", wall_time="w")


@pytest.fixture
def rig(sim_cfg: config.Config) -> Rig:
    valves = FakeValves()
    count = RunCounter(Metrics())
    return Rig(Neighbours(Planner(sim_cfg.geometry, sim_cfg.ejection), {}, valves, count), valves, count)


def stone(n: int, behind_ms: float) -> Track:
    """Stone n, on the same line as stone 1 and `behind_ms` after it (500 mm/s, 2 mm long)."""
    return Track(f"S{n:06d}", t_obs_ns=int((1_000 + behind_ms) * MS), x_mm=20.0, speed_mm_s=500.0, length_mm=2.0)


def test_stones_far_apart_keep_their_decisions(rig: Rig) -> None:
    first = stone(1, 0)
    dec = rig.decide(first, "SELECT")
    rig.schedule(first, dec)
    later = rig.decide(stone(2, 60), "FLIP")
    assert (dec.route, later.decision.bin, later.route, later.decision.reason) == ("SELECT", "FLIP", "FLIP", "sorted")
    assert rig.valves.cancelled == [] and rig.count.stats.conflicts == 0


def test_a_planned_jet_that_would_catch_the_new_stone_is_cancelled(rig: Rig) -> None:
    """Stone 2 falls past SELECT on its way to FLIP 2 ms behind stone 1, whose SELECT jet is open then."""
    first = stone(1, 0)
    row1 = rig.schedule(first, rig.decide(first, "SELECT"))
    dec2 = rig.decide(stone(2, 2), "FLIP")
    assert rig.valves.cancelled == [plan_pulse(first, "SELECT", rig.planner.geometry, rig.planner.ejection)]
    # The neighbour now falls to REJECT and its row says why; its decision stays; its pulse is no longer planned.
    assert (row1.bin, row1.route, row1.reason) == ("SELECT", "REJECT", "neighbour conflict: its jet into SELECT "
                                                   "would also catch S000002")
    assert "S000001" not in rig.planner.pulses
    # Falling to REJECT, stone 1 passes the FLIP nozzle just before stone 2: stone 2's FLIP jet
    # would catch it, so stone 2 is not blown either (both stones take the default trajectory).
    assert (dec2.decision.bin, dec2.route) == ("FLIP", "REJECT")
    assert (dec2.decision.reason, dec2.decision.flagged) == ("neighbour conflict: its jet into FLIP would also "
                                                             "catch S000001", False)
    assert rig.count.stats.conflicts == 2
    assert rig.count.stats.co_deflection_risks == {}


def test_the_first_is_cancelled_and_the_second_keeps_its_jet_when_that_jet_is_clear(rig: Rig) -> None:
    """The case of the issue (S000056 cancelled, S000057 FLIP): 5 ms apart, stone 1's SELECT jet
    would catch stone 2 on its way to FLIP, but stone 2's FLIP jet clears stone 1 (the windows
    are shorter at the lower nozzle).  Stone 1 falls untouched; stone 2 is sorted."""
    first = stone(1, 0)
    row1 = rig.schedule(first, rig.decide(first, "SELECT"))
    second = rig.decide(stone(2, 5), "FLIP")
    assert (row1.bin, row1.route) == ("SELECT", "REJECT") and row1.reason.startswith("neighbour conflict")
    assert (second.decision.bin, second.route, second.decision.reason) == ("FLIP", "FLIP", "sorted")
    assert rig.count.stats.conflicts == 1


def test_a_conflict_takes_the_safe_route_select_when_that_jet_is_clear(sim_cfg: config.Config) -> None:
    """6 ms behind a stone falling to REJECT, a CUT jet would catch it but a SELECT jet would not:
    with machine.safe_route = "SELECT" the stone goes for review (§8.2: CUT -> SELECT costs 3,
    CUT -> REJECT 8); with REJECT, or when the SELECT jet would catch it too, it falls."""
    def route_behind(safe: str, behind_ms: float) -> Routed:
        nb = Neighbours(Planner(sim_cfg.geometry, sim_cfg.ejection), {}, FakeValves(), RunCounter(Metrics()), safe)
        nb.resolve(stone(1, 0), Decision("REJECT", "inky", "opaque", 0.9, False, "sorted"))
        return nb.resolve(stone(2, behind_ms), Decision("CUT", "blue", "transparent", 0.9, False, "sorted"))

    select = route_behind("SELECT", 6)
    assert (select.decision.bin, select.route) == ("CUT", "SELECT")
    assert select.decision.reason == "neighbour conflict: its jet into CUT would also catch S000001"
    assert route_behind("REJECT", 6).route == "REJECT"
    assert route_behind("SELECT", 3).route == "REJECT"  # the SELECT jet would catch it too


def test_a_jet_too_late_to_cancel_flags_the_new_stone_with_the_bin_it_may_be_in(rig: Rig) -> None:
    rig.valves.can_cancel = False
    first = stone(1, 0)
    row1 = rig.schedule(first, rig.decide(first, "SELECT"))
    dec2 = rig.decide(stone(2, 2), "FLIP")
    assert len(rig.valves.cancelled) == 1
    assert (row1.bin, row1.route, row1.reason) == ("SELECT", "SELECT", "sorted")  # still fires as planned
    assert "S000001" in rig.planner.pulses
    assert dec2 == Routed(Decision("FLIP", "blue", "transparent", 0.93, True,
                                   "co-deflection risk: a neighbour's jet into SELECT could not be cancelled"),
                          "REJECT")
    assert rig.count.stats.co_deflection_risks == {"S000002": "SELECT"}
    assert rig.count.stats.conflicts == 0


def test_a_pulse_already_resolved_is_not_cancelled_but_still_a_risk(rig: Rig) -> None:
    """Its outcome came in (it fired): no cancel is tried, the jet was open."""
    first = stone(1, 0)
    rig.schedule(first, rig.decide(first, "SELECT"))
    del rig.neighbours.pending["S000001"]  # resolved: the pipeline pops it when the outcome comes
    dec2 = rig.decide(stone(2, 2), "FLIP")
    assert rig.valves.cancelled == []
    assert (dec2.decision.bin, dec2.route, dec2.decision.flagged) == ("FLIP", "REJECT", True)
    assert rig.count.stats.co_deflection_risks == {"S000002": "SELECT"}


def test_of_several_stuck_jets_the_risk_names_the_first_the_stone_meets(rig: Rig) -> None:
    """CUT's nozzle is highest (30 mm drop), then SELECT (45), then FLIP (60).  Stone 3, between
    stones 1 and 2, meets stone 2's CUT jet and then stone 1's SELECT jet on its way to FLIP."""
    rig.valves.can_cancel = False
    a, b = stone(1, 0), stone(2, 7)  # 7 ms apart: b's CUT jet misses a (their windows just clear)
    rig.schedule(a, rig.decide(a, "SELECT"))
    dec_b = rig.decide(b, "CUT")
    assert dec_b.route == "CUT"
    rig.schedule(b, dec_b)
    assert rig.count.stats.co_deflection_risks == {} and rig.count.stats.conflicts == 0
    dec = rig.decide(stone(3, 3.5), "FLIP")
    assert len(rig.valves.cancelled) == 2  # both were tried
    assert dec.decision.reason == "co-deflection risk: a neighbour's jet into CUT could not be cancelled"
    assert rig.count.stats.co_deflection_risks == {"S000003": "CUT"}


def test_a_new_jet_that_would_catch_a_neighbour_sends_the_new_stone_to_reject(rig: Rig) -> None:
    """Stone 1 falls to REJECT (no jet); stone 2, 2 ms behind, is bound for CUT: its jet would
    also catch stone 1 at the CUT nozzle, so it is not planned.  Its flag is kept."""
    rig.decide(stone(1, 0), "REJECT")
    dec2 = rig.decide(stone(2, 2), "CUT", flagged=True)
    assert (dec2.decision.bin, dec2.route, dec2.decision.flagged) == ("CUT", "REJECT", True)
    assert dec2.decision.reason == "neighbour conflict: its jet into CUT would also catch S000001"
    assert rig.valves.cancelled == []
    assert rig.count.stats.conflicts == 1


def test_a_stone_bound_for_reject_is_never_a_probe_conflict(rig: Rig) -> None:
    rig.decide(stone(1, 0), "REJECT")
    dec2 = rig.decide(stone(2, 2), "REJECT")
    assert (dec2.route, dec2.decision.reason) == ("REJECT", "sorted")
    assert rig.count.stats.conflicts == 0
