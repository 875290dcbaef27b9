"""The run summary's truth section comes from the simulated machine, through its run seam."""

from __future__ import annotations

from sorterd.config import Config
from sorterd.sim.machine import SimMachine
from sorterd.sorting.stats import RunStats
from sorterd.sorting.summary import format_text, summarize


def test_a_run_without_a_truth_reports_only_what_the_daemon_knows(sim_cfg: Config) -> None:
    s = summarize(sim_cfg, RunStats(), None, "v1", 1.0)
    assert "stones_fed" not in s and "accuracy" not in s and "sync_error_us" not in s
    assert format_text(s).splitlines()[0] == "objects decided 0 (0 clusters)"


def test_the_simulated_machine_feeds_and_counts_through_its_seam(sim_cfg: Config) -> None:
    m = SimMachine(sim_cfg)
    m.feed(20)
    m.start_at(5_000_000_000)
    entries = sorted(s.t_entry_ns for s in m.world.stones)
    assert entries[0] >= 5_000_000_000
    assert (m.fed_by(entries[0] - 1), m.fed_by(entries[9]), m.fed_by(entries[-1])) == (0, 10, 20)
    assert entries[-1] < m.all_past_ns() < m.last_landing_ns()


def test_unseen_stones_fall_to_reject_and_a_stray_jet_is_misrouting(sim_cfg: Config) -> None:
    m = SimMachine(sim_cfg)
    m.feed(20)
    m.start_at(1_000_000_000)
    s = summarize(sim_cfg, RunStats(), m.truth(), "v1", 1.0)
    assert (s["stones_fed"], s["stones_seen"], s["unseen_stones"]) == (20, 0, 20)
    assert s["bins"]["REJECT"] == 20 and s["landed_as_routed_rate"] == 1.0 and s["misrouted"] == []
    keys = list(s)
    assert keys.index("wall_s") < keys.index("stones_fed") < keys.index("misrouted")  # the JSON's order

    # A jet that nobody planned, open across stone 7's passage (the edge observer a GPIO backend calls).
    stone = m.world.stones[7]
    start, end = m.world.nozzle_passage(stone, "CUT")
    margin = 20_000_000  # well beyond the valve's latency and jitter
    m.open_jet("CUT", start - margin, end)
    s = summarize(sim_cfg, RunStats(), m.truth(), "v1", 1.0)
    stray = [x for x in s["misrouted"] if x["sim_id"] == 7]
    assert stray == [{"sim_id": 7, "stone_id": None, "route": "REJECT", "landed": "CUT", "valve_status": "unseen"}]
    assert s["landed_as_routed_rate"] < 1.0
    assert format_text(s).splitlines()[0].startswith("stones fed 20, seen 0, objects decided 0")


def test_the_text_summary_prints_latency_with_one_decimal_and_the_json_keeps_its_precision(sim_cfg: Config) -> None:
    stats = RunStats()
    for stage in ("segment", "infer", "decide", "compute", "model_only"):
        stats.latency_s[stage].extend([0.00061234, 0.00163456])
    s = summarize(sim_cfg, stats, None, "v1", 1.0)
    assert s["latency_ms"]["segment"]["p50"] == round(s["latency_ms"]["segment"]["p50"], 4) != \
        round(s["latency_ms"]["segment"]["p50"], 1)
    line = next(x for x in format_text(s).splitlines() if x.startswith("latency ms"))
    figures = line.split(": ", 1)[1].split("  ")
    assert len(figures) == 5
    for figure in figures:
        _, value = figure.split(" ")
        p50, p99 = value.split("/")
        assert len(p50.split(".")[1]) == 1 and len(p99.split(".")[1]) == 1, line
