"""The one place that counts: each event moves the run's figure and its Prometheus series together."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sorterd.metrics import Metrics
from sorterd.sorting.stats import LATENCIES, STAGES, RunCounter, RunStats


def sample(m: Metrics, name: str, **labels: str) -> float:
    """A series' current value as a scrape would show it (0 when never set)."""
    return m.registry.get_sample_value(name, labels) or 0.0


# event, the RunStats field it moves, the Prometheus sample and labels, and by how much
PAIRED: list[tuple[Callable[[RunCounter], None], str, str, dict[str, str], int]] = [
    (lambda c: c.trigger_dropped(), "triggers_dropped", "sorterd_queue_overflow_total", {"queue": "trigger"}, 1),
    (lambda c: c.captured(0.004), "captures", "sorterd_captures_total", {}, 1),
    (lambda c: c.pair_dropped(), "pairs_dropped", "sorterd_queue_overflow_total", {"queue": "pairs"}, 1),
    (lambda c: c.lighting_fault(), "lighting_faults", "sorterd_lighting_faults_total", {}, 1),
    (lambda c: c.camera_failure(), "camera_failures", "sorterd_camera_failures_total", {}, 1),
    (lambda c: c.gap_triggers(3), "gap_triggers", "sorterd_camera_gap_triggers_total", {}, 3),
    (lambda c: c.passed_unseen(2), "passed_unseen", "sorterd_stones_passed_unseen_total", {}, 2),
    (lambda c: c.untriggered(4), "untriggered", "sorterd_stones_untriggered_total", {}, 4),
    (lambda c: c.conflict(), "conflicts", "sorterd_neighbour_conflicts_total", {}, 1),
    (lambda c: c.late_off_edge(), "late_off_edges", "sorterd_valve_late_off_edges_total", {}, 1),
    (lambda c: c.deadline_miss(), "deadline_misses", "sorterd_deadline_misses_total", {}, 1),
]


@pytest.mark.parametrize(("event", "figure", "series", "labels", "step"), PAIRED,
                         ids=[p[1] for p in PAIRED])
def test_each_event_counts_the_figure_and_the_series_alike(
        event: Callable[[RunCounter], None], figure: str, series: str, labels: dict[str, str], step: int) -> None:
    m = Metrics()
    c = RunCounter(m)
    event(c)
    event(c)
    assert getattr(c.stats, figure) == 2 * step
    assert sample(m, series, **labels) == 2 * step
    # Nothing else moved: every other figure is still at its start.
    fresh = RunStats()
    others = {f: getattr(c.stats, f) for f in vars(fresh) if f not in (figure, "latency_s")}
    assert others == {f: getattr(fresh, f) for f in others}


def test_a_decided_object_counts_clusters_and_flags_only_when_they_are() -> None:
    m = Metrics()
    c = RunCounter(m)
    c.decided_object(cluster=False, flagged=False)
    c.decided_object(cluster=True, flagged=False)
    c.decided_object(cluster=True, flagged=True)
    assert (c.stats.objects, c.stats.clusters, c.stats.flagged) == (3, 2, 1)
    assert sample(m, "sorterd_clusters_total") == 2
    assert sample(m, "sorterd_flagged_total") == 1


def test_finished_stones_count_by_decided_bin_in_the_summary_and_the_series_and_by_route_apart() -> None:
    m = Metrics()
    c = RunCounter(m)
    for b, route in (("CUT", "CUT"), ("FLIP", "FLIP"), ("FLIP", "REJECT"), ("REJECT", "REJECT")):
        c.finished(b, route)
    assert c.stats.decided == {"CUT": 1, "SELECT": 0, "FLIP": 2, "REJECT": 1}
    assert c.stats.routed == {"CUT": 1, "SELECT": 0, "FLIP": 1, "REJECT": 2}
    assert {b: sample(m, "sorterd_stones_total", bin=b) for b in c.stats.decided} == c.stats.decided


def test_a_co_deflection_risk_names_the_stone_and_its_bin() -> None:
    m = Metrics()
    c = RunCounter(m)
    c.co_deflection_risk("S000007", "SELECT")
    c.co_deflection_risk("S000009", "CUT")
    assert c.stats.co_deflection_risks == {"S000007": "SELECT", "S000009": "CUT"}
    assert sample(m, "sorterd_co_deflection_risks_total") == 2


def test_stage_latencies_go_to_the_samples_and_the_histogram() -> None:
    m = Metrics()
    c = RunCounter(m)
    c.stage_latencies(0.002, 0.003, 0.0005, 0.0025)
    got = {s: list(c.stats.latency_s[s]) for s in STAGES}
    assert got == {"segment": [0.002], "infer": [0.003], "decide": [0.0005], "compute": [0.0055],
                   "model_only": [0.0025]}
    for stage, (v,) in got.items():
        assert sample(m, "sorterd_stage_seconds_count", stage=stage) == 1
        assert sample(m, "sorterd_stage_seconds_sum", stage=stage) == pytest.approx(v)


def test_the_summary_only_latencies_have_no_series() -> None:
    """exposure_to_pulse and trigger_to_exposure are the summary's samples, not histogram stages."""
    m = Metrics()
    c = RunCounter(m)
    c.exposure_to_pulse(0.03)
    c.captured(0.0012)
    assert list(c.stats.latency_s["exposure_to_pulse"]) == [0.03]
    assert list(c.stats.latency_s["trigger_to_exposure"]) == [0.0012]
    assert set(c.stats.latency_s) == set(LATENCIES)
    for stage in ("exposure_to_pulse", "trigger_to_exposure"):
        assert m.registry.get_sample_value("sorterd_stage_seconds_count", {"stage": stage}) is None


def test_pulse_outcomes_are_series_by_valve_and_status_kind() -> None:
    m = Metrics()
    c = RunCounter(m)
    c.pulse_outcome("CUT", "fired")
    c.pulse_outcome("CUT", "refused: late")
    c.pulse_outcome("FLIP", "unknown: link lost")
    c.valve_unknown()
    assert sample(m, "sorterd_pulses_total", valve="CUT", status="fired") == 1
    assert sample(m, "sorterd_pulses_total", valve="CUT", status="refused") == 1
    assert sample(m, "sorterd_pulses_total", valve="FLIP", status="unknown") == 1
    assert c.stats.valve_unknown == 1


def test_queue_depths_and_the_model_are_gauges_and_info() -> None:
    m = Metrics()
    c = RunCounter(m)
    c.queue_depth("pairs", 3)
    c.queue_depth("pairs", 1)
    c.queue_depth("record", 7)
    c.model("v009", "ab")
    assert sample(m, "sorterd_queue_depth", queue="pairs") == 1
    assert sample(m, "sorterd_queue_depth", queue="record") == 7
    assert sample(m, "sorterd_model_info", version="v009", release="", sha256="ab") == 1
    c.model("v003@r7", "cd")  # a store release: its number is a label of its own
    assert sample(m, "sorterd_model_info", version="v003@r7", release="7", sha256="cd") == 1
