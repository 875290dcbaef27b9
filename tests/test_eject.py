"""Ejection timing math and the co-deflection guard."""

from __future__ import annotations

import math

import pytest

from sorterd.config import EjectionConfig, GeometryConfig
from sorterd.sorting.eject import Planner, jet_interval, lip_time_ns, nozzle_passage, nozzles_passed, plan_pulse
from sorterd.sorting.physics import G_MM_S2, fall_time_s
from sorterd.sorting.track import Track

GEO = GeometryConfig()
EJ = EjectionConfig()


def track(sid: str = "S1", t: int = 0, x: float = 4.0, v: float = 400.0, length: float = 3.0) -> Track:
    return Track(sid, t, x, v, length)


def test_lip_time_from_position_and_speed() -> None:
    # 40 mm to go at 400 mm/s = 100 ms.
    assert lip_time_ns(track(t=5_000, x=4.0), GEO) == 5_000 + 100_000_000


def test_free_fall_time() -> None:
    assert fall_time_s(30.0) == pytest.approx(math.sqrt(0.06 / 9.80665))
    assert fall_time_s(30.0) == pytest.approx(0.0782, abs=1e-4)


def test_nozzle_passage_window() -> None:
    tr = track(length=3.0)
    start, end = nozzle_passage(tr, "CUT", GEO)
    centre = lip_time_ns(tr, GEO) + fall_time_s(30.0) * 1e9
    speed = G_MM_S2 * fall_time_s(30.0)  # ~767 mm/s at the CUT nozzle
    assert (start + end) / 2 == pytest.approx(centre, abs=2)
    assert (end - start) / 1e9 == pytest.approx((3.0 + GEO.jet_width_mm) / speed, rel=1e-6)


def test_pulse_leads_by_valve_latency_and_has_margins() -> None:
    tr = track()
    start, end = nozzle_passage(tr, "SELECT", GEO)
    p = plan_pulse(tr, "SELECT", GEO, EJ)
    assert p.start_ns == start - 1_000_000 - 3_000_000
    assert p.end_ns == end + 1_000_000 - 3_000_000
    assert jet_interval(p, EJ) == (start - 1_000_000, end + 1_000_000)


def test_per_valve_latency() -> None:
    ej = EjectionConfig(opening_latency_ms={"CUT": 3.0, "SELECT": 3.0, "FLIP": 6.0})
    a = plan_pulse(track(), "FLIP", GEO, EJ)
    b = plan_pulse(track(), "FLIP", GEO, ej)
    assert a.start_ns - b.start_ns == 3_000_000


def test_pulse_is_capped() -> None:
    ej = EjectionConfig(max_pulse_ms=4.0)
    p = plan_pulse(track(length=8.0, v=150.0), "CUT", GEO, ej)
    assert p.duration_ns == 4_000_000


def test_faster_stone_reaches_nozzle_sooner() -> None:
    slow = nozzle_passage(track(v=300.0), "CUT", GEO)[0]
    fast = nozzle_passage(track(v=500.0), "CUT", GEO)[0]
    assert fast < slow


def test_nozzle_order() -> None:
    assert nozzles_passed("CUT", GEO) == ["CUT"]
    assert nozzles_passed("FLIP", GEO) == ["CUT", "SELECT", "FLIP"]
    assert nozzles_passed("REJECT", GEO) == ["CUT", "SELECT", "FLIP"]


def test_neighbour_conflict_detected_both_ways() -> None:
    planner = Planner(GEO, EJ)
    a = track("A", x=10.0)
    b = track("B", x=7.5)  # 2.5 mm behind: ~6 ms later at every nozzle
    planner.add(a)
    planner.add(b)
    pa = plan_pulse(a, "CUT", GEO, EJ)
    assert planner.conflicts(pa) == ["B"]
    planner.pulses["A"] = pa
    assert planner.caught_by(b, "FLIP") == ["A"]  # B falls past CUT's open jet


def test_well_separated_stones_do_not_conflict() -> None:
    planner = Planner(GEO, EJ)
    a, b = track("A", x=20.0), track("B", x=8.0)  # 30 ms apart
    planner.add(a)
    planner.add(b)
    pa = plan_pulse(a, "CUT", GEO, EJ)
    planner.pulses["A"] = pa
    assert planner.conflicts(pa) == []
    assert planner.caught_by(b, "REJECT") == []


def test_stone_deflected_above_is_not_caught_below() -> None:
    planner = Planner(GEO, EJ)
    a, b = track("A", x=10.0), track("B", x=7.5)
    planner.add(a)
    planner.add(b)
    planner.pulses["A"] = plan_pulse(a, "FLIP", GEO, EJ)
    # B is blown out at CUT before it reaches the FLIP nozzle.
    assert planner.caught_by(b, "CUT") == []


def test_forget_old_tracks() -> None:
    planner = Planner(GEO, EJ)
    planner.add(track("A"))
    planner.forget_before(nozzle_passage(track("A"), "FLIP", GEO)[1] + 1)
    assert planner.tracks == {}


def test_cluster_passage_spans_its_members() -> None:
    single = nozzle_passage(track(length=6.0), "SELECT", GEO)
    cluster = nozzle_passage(Track("C", 0, 4.0, 400.0, 6.0, spread_mm=6.0), "SELECT", GEO)
    # Members 6 mm apart on the channel pass the nozzle 15 ms apart (6 mm / 400 mm/s).
    assert (cluster[1] - cluster[0]) - (single[1] - single[0]) == pytest.approx(15_000_000, abs=2)
