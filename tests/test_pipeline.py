"""Pipeline behaviour under stress: overflow, neighbours, safe routes."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run
from sorterd.sorting.pipeline import Pipeline


def sim(tmp_path: Path, **sim_over: object) -> config.Config:
    return load_config(config.sim_config_path(), {
        "record": {"log_dir": str(tmp_path)}, "metrics": {"enabled": False}, "sim": dict(sim_over)})


@pytest.mark.slow
def test_pair_queue_overflow_is_counted_and_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled segmenter: pairs beyond the queue are dropped, counted, and nothing fires blind."""
    real = Pipeline._compute

    def slow_compute(self: Pipeline, pair, known):  # type: ignore[no-untyped-def]
        time.sleep(0.08)
        return real(self, pair, known)

    monkeypatch.setattr(Pipeline, "_compute", slow_compute)
    cfg = sim(tmp_path, rate_per_s=40.0, seed=12)
    cfg = config.replace(cfg, pipeline=config.PipelineConfig(queue_size=1))
    s = run(cfg, RunOptions(stones=60, progress=False), io.StringIO()).summary
    assert s["pairs_dropped"] > 0
    assert sum(s["bins"].values()) == 60
    # Every stone that did not land as decided was never seen or missed its
    # deadline, and so fell to REJECT: no jet hit a stone it was not meant for.
    failed = round(60 * (1 - s["landed_as_decided_rate"]))
    assert failed <= s["unseen_stones"] + s["deadline_misses"]
    assert s["bins"]["REJECT"] >= s["unseen_stones"] + s["deadline_misses"]
    # The stones of the dropped pairs have no record; the ledger counts each one.
    assert s["passed_unseen"] == s["unseen_beam_events"] > 0
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]


@pytest.mark.slow
def test_close_neighbours_never_co_deflected(tmp_path: Path) -> None:
    """Many close pairs: a jet that would catch both stones is not fired."""
    # At 800 mm/s a 0.3-2 mm gap is only ~4-7 ms at the nozzles: jets would overlap.
    s = run(sim(tmp_path, close_pair_prob=0.3, touching_pair_prob=0.1, seed=21, speed_mm_s=800.0),
            RunOptions(stones=200, progress=False), io.StringIO()).summary
    assert s["neighbour_conflicts"] > 0
    assert s["clusters"] > 0
    # At 800 mm/s a stone is in view for 40 ms: on a loaded machine some are
    # never captured (and fall to REJECT).
    # Every stone landed where the machine sent it (no jet caught a neighbour), and the
    # daemon counted each one it lost sight of itself.
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]
    # The ledger equals the beam's truth but for one known edge case with close followers
    # (a cluster's span and a follower's edge; once in a CI run: 5 vs 4): at most one off.
    assert abs(s["passed_unseen"] - s["unseen_beam_events"]) <= 1
    assert s["unseen_stones"] <= 100  # half: beyond that the pipeline is broken, not loaded


@pytest.mark.slow
def test_safe_route_select_blows_clusters_to_select(tmp_path: Path) -> None:
    cfg = sim(tmp_path, touching_pair_prob=0.15, close_pair_prob=0.0, seed=4)
    cfg = config.replace(cfg, machine=config.MachineConfig(safe_route="SELECT"))
    res = run(cfg, RunOptions(stones=80, progress=False), io.StringIO())
    s = res.summary
    assert s["clusters"] > 0
    from sorterd.sorting.record import read_rows

    clusters = [r for r in read_rows(res.batch_dir / "stones.db") if r["cluster"]]
    assert clusters
    for r in clusters:
        # Blown to SELECT, unless that jet would also have caught a neighbour.
        assert (r["bin"], r["valve_status"]) == ("SELECT", "fired") or r["reason"].startswith("neighbour conflict")
    assert sum(r["bin"] == "SELECT" for r in clusters) >= len(clusters) / 2
    # A neighbour conflict keeps its decided bin and lands on its route (REJECT): counted against
    # landed-as-decided, and explained; where every stone landed as routed is the invariant.
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]
    as_decided = s["landed_as_decided_rate"] * s["stones_fed"] + s["neighbour_conflicts"]
    assert as_decided >= 0.97 * s["stones_fed"]


@pytest.mark.slow
def test_a_jet_too_late_to_cancel_and_the_neighbour_it_may_carry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valves that can never cancel: a stone decided after its close neighbour's pulse was
    sent may be carried by that jet.  Its record says which bin it may be in, and flags it."""
    from sorterd.sim.parts.valves import SimValves
    from sorterd.sorting.record import read_rows

    monkeypatch.setattr(SimValves, "cancel", lambda self, pulse: False)
    res = run(sim(tmp_path, close_pair_prob=0.3, touching_pair_prob=0.0, seed=21, speed_mm_s=800.0),
              RunOptions(stones=200, progress=False), io.StringIO())
    s = res.summary
    assert s["co_deflection_risks"] > 0
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]  # its route, or the bin it risked
    risky = [r for r in read_rows(res.batch_dir / "stones.db") if r["reason"].startswith("co-deflection risk")]
    assert len(risky) == s["co_deflection_risks"]
    assert all(r["flagged"] and r["route"] == "REJECT" and r["planned_on_ns"] is None for r in risky)
    assert any(r["bin"] != "REJECT" for r in risky)  # the decision is kept, not overwritten


@pytest.mark.slow
def test_neighbour_conflicts_keep_the_decided_bin_and_record_the_route(tmp_path: Path) -> None:
    """Close stones: every conflict row says what was decided (bin), where it went (route) and why
    (reason); the summary's `decided` counts bins, `routed` routes; every stone landed as routed."""
    from collections import Counter

    from sorterd.domain import BINS
    from sorterd.sorting.record import read_rows

    res = run(sim(tmp_path, close_pair_prob=0.4, touching_pair_prob=0.0, seed=21, speed_mm_s=800.0),
              RunOptions(stones=200, progress=False), io.StringIO())
    s, rows = res.summary, read_rows(res.batch_dir / "stones.db")
    conflicts = [r for r in rows if r["reason"].startswith("neighbour conflict")]
    assert len(conflicts) == s["neighbour_conflicts"] > 0
    for r in conflicts:
        assert r["route"] == "REJECT" and r["valve_status"] in ("cancelled", "no pulse"), r
        assert r["reason"].startswith(f"neighbour conflict: its jet into {r['bin']} would also catch S"), r
    assert any(r["bin"] != r["route"] for r in conflicts)  # a decided jet bin survives its conflict
    assert s["decided"] == {b: Counter(r["bin"] for r in rows)[b] for b in BINS}
    assert s["routed"] == {b: Counter(r["route"] for r in rows)[b] for b in BINS}
    assert s["landed_as_routed_rate"] == 1.0, s["misrouted"]
