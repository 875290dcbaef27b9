"""A daemon that sorts for days keeps bounded state: no per-stone list, bounded latency samples.

The pipeline is driven over thousands of stones on the fakes of test_pipeline_fakes; then every
container the pipeline can reach must hold no more than a constant, whatever the stone count.
`Samples` (sorterd/quantiles.py) is checked for its exactness up to its cap and its error bound
after.  The RSS over a 100,000-stone run is bench/memory.py's (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import bisect
import math
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd import config, quantiles
from sorterd.cli.compose import load_config
from sorterd.clock import VirtualClock
from sorterd.domain import JET_BINS
from sorterd.metrics import Metrics
from sorterd.parts import Parts
from sorterd.parts.camera import Frame
from sorterd.quantiles import GROWTH, REL_ERROR, Samples
from sorterd.sim.machine import SimMachine
from sorterd.sim.stones import StoneSpec
from sorterd.sim.truth import recorded_rows
from sorterd.sim.world import World
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder, StoneRow, make_batch_dir, read_rows
from sorterd.sorting.stats import LATENCIES
from sorterd.sorting.summary import summarize
from tests.test_pipeline_fakes import (
    BACK_STONE,
    GAP_NS,
    PPM,
    START_NS,
    STONES,
    FakeCamera,
    FakeLights,
    FakeModel,
    FakeTrigger,
    FakeValves,
    Stone,
)

# What any one structure may hold after a run, whatever its length: the recent-latency
# ring (quantiles.RECENT) is the largest on purpose; a per-stone list would hold every stone.
CONTAINER_LIMIT = quantiles.RECENT + 64


def max_buckets(lo: float, hi: float, floor: float) -> int:
    """How many histogram buckets values of |v| in [lo, hi] can fill: a bound by the range, not the count."""
    span = math.log(max(hi, floor) / floor) / math.log(GROWTH) - math.log(max(lo, floor) / floor) / math.log(GROWTH)
    return int(span) + 2


# -- Samples -------------------------------------------------------------------------


def test_samples_are_exact_up_to_their_cap() -> None:
    values = np.random.default_rng(1).lognormal(-6, 1, 1000)
    s = Samples(floor=1e-9, exact_cap=1000)
    s.extend(list(values))
    assert s.exact and len(s) == 1000 and list(s) == list(values)
    for q in (0.5, 0.99):
        assert s.quantile(q) == float(np.percentile(values, q * 100))
    assert s.recent(3) == list(values[::-1][:3])


def test_folded_samples_are_within_the_error_bound_and_their_size_is_bounded_by_the_range() -> None:
    rng = np.random.default_rng(2)
    s = Samples(floor=1.0, exact_cap=100, recent=10)
    seen: list[float] = []
    sizes = []
    for _ in range(4):
        batch = list(rng.normal(0, 20_000, 25_000).round())  # signed ns errors, some exactly 0
        s.extend(batch)
        seen += batch
        sizes.append(len(s._buckets))
    assert not s.exact and s.exact_array() is None and len(s) == len(seen)
    assert len(s.recent(100)) == 10
    # Bounded by the values' range, not by their count: 4x the samples, no more than the bound.
    mags = np.abs(seen)
    assert sizes[-1] <= 2 * max_buckets(1.0, float(mags.max()), 1.0)
    for absolute in (False, True):
        ordered = np.sort(mags if absolute else np.asarray(seen))
        for q in (0.01, 0.5, 0.9, 0.99):
            # The bucket of the order statistic at numpy's rank, within REL_ERROR of it (0 below the floor).
            v = ordered[math.floor(q * (len(ordered) - 1))]
            got = s.quantile(q, absolute)
            assert got == 0.0 if abs(v) < 1.0 else abs(got - v) <= REL_ERROR * abs(v), (q, absolute, got, v)
    assert s.max_abs == float(mags.max())


def test_a_folded_p99_reads_the_tail_not_a_sample_of_it() -> None:
    s = Samples(floor=1e-9, exact_cap=10)
    s.extend([0.002] * 990 + [0.250] * 10)  # 1 % of stones an order of magnitude late
    assert s.quantile(0.5) == pytest.approx(0.002, rel=REL_ERROR)
    assert s.quantile(0.995) == pytest.approx(0.250, rel=REL_ERROR)


def test_bad_settings_name_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"floor > 0"):
        Samples(floor=0.0)


# -- the pipeline over many stones -----------------------------------------------------


class WindowCamera(FakeCamera):
    """The fakes' camera, drawing only the stones near the view (thousands of stones, one frame's work)."""

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        img = self.reference(mode)
        edges = [s.edge_ns for s in self.stones]
        lo, hi = bisect.bisect_left(edges, t_ns - 200_000_000), bisect.bisect_right(edges, t_ns + 50_000_000)
        for s in self.stones[lo:hi]:
            colour = BACK_STONE if mode == "backlit" else s.top
            for cx in s.centres_mm(t_ns):
                cv2.circle(img, (round(cx * PPM * 16), round(s.y_mm * PPM * 16)), round(s.size_mm / 2 * PPM * 16),
                           (colour, colour, colour), -1, cv2.LINE_AA, shift=4)
        return Frame(img, t_ns, mode)


def run_many(tmp_path: Path, cfg: config.Config, n: int) -> tuple[Pipeline, list[dict[str, Any]]]:
    """n stones of the fakes' kinds (singles, one touching pair in five), one per GAP_NS."""
    clock = VirtualClock()
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))

    async def main() -> tuple[Pipeline, list[dict[str, Any]]]:
        t0 = clock.now_ns()
        kinds = [s for s, _ in STONES]
        stones = [Stone(t0 + START_NS + i * GAP_NS, k.size_mm, k.y_mm, k.top, k.twin_mm)
                  for i, k in ((i, kinds[i % len(kinds)]) for i in range(n))]
        parts = Parts(camera=WindowCamera(stones, clock), lights=FakeLights(),
                      trigger=FakeTrigger([s.edge_ns for s in stones], clock), valves=FakeValves(clock))
        recorder = Recorder(make_batch_dir(tmp_path, "many"), 0.01, 10_000, 0)
        pipeline = Pipeline(cfg, clock, parts, FakeModel(), recorder, Metrics())  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(pipeline.run(), 600.0)
        finally:
            recorder.close()
        return pipeline, read_rows(recorder.db_path)

    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def reachable(root: object) -> Iterator[tuple[str, Any]]:
    """(path, value) of every container and sorterd object reachable from root through sorterd
    objects' attributes and containers; the fakes (the test's own parts) and numpy frames are not walked."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("pipeline", root)]
    while todo:
        path, v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, (list, tuple, set, frozenset, deque, array)):
            yield path, v
            todo += [(f"{path}[]", x) for x in v]
        elif isinstance(v, dict):
            yield path, v
            todo += [(f"{path}[{k!r}]", x) for k, x in v.items()]
        elif type(v).__module__.startswith("sorterd.") and hasattr(v, "__dict__"):
            yield path, v
            todo += [(f"{path}.{k}", x) for k, x in vars(v).items()]


def test_the_pipeline_keeps_no_per_stone_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 stones: nothing the pipeline holds grows with them; every row is in stones.db only."""
    monkeypatch.setattr(quantiles, "EXACT_CAP", 256)  # so the latencies fold into their histograms here
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False},
                                                 "record": {"thumbnail_px": 0, "flagged_images": False}})
    n = 2000
    pipeline, rows = run_many(tmp_path, cfg, n)
    s = pipeline.stats
    assert len(rows) == s.finished == s.objects  # every decided stone finished and recorded
    # Enough of them for a per-stone list to stand out (a loaded host may let some pass unseen).
    assert s.objects > 2 * CONTAINER_LIMIT
    assert summarize(cfg, s, None, "fake-1", 1.0)["objects_decided"] == len(rows)
    # A Samples' count and its buckets are not stones held: its buckets are bounded by the range below.
    grown = {path: len(v) for path, v in reachable(pipeline)
             if not isinstance(v, Samples) and "._buckets" not in path
             and hasattr(v, "__len__") and len(v) > CONTAINER_LIMIT}
    assert grown == {}, f"structures that grow with the stones: {grown}"
    for stage in LATENCIES:
        samples = s.latency_s[stage]
        assert len(samples) > quantiles.EXACT_CAP and not samples.exact, stage  # folded into buckets
        assert len(samples._buckets) <= max_buckets(1e-9, 10.0, 1e-9), stage
    t2e = s.latency_s["trigger_to_exposure"]
    assert 0 < t2e.quantile(0.5) <= t2e.quantile(0.99) <= t2e.max_abs * (1 + REL_ERROR)
    # The summary's figures from counters are those the rows say.
    summary = summarize(cfg, s, None, "fake-1", 1.0)
    assert summary["flagged_rate"] == round(sum(r["flagged"] for r in rows) / len(rows), 4)
    assert summary["decided"] == {b: sum(1 for r in rows if r["bin"] == b) for b in summary["decided"]}


def test_the_simulators_truth_reads_back_exactly_the_rows_handed_to_the_recorder(tmp_path: Path) -> None:
    """The truth section compares the world with stones.db: the rows must come back as they went
    in, in the order they were finished (the first row to claim a world stone owns it)."""
    rows = []
    for i, (sid, status) in enumerate([("S000003", "fired"), ("S000001", "no pulse"),
                                       ("S000002", "refused: controller: late at fire (0.3 ms)")]):
        values: dict[str, Any] = {f.name: 0 for f in fields(StoneRow)}
        values.update(stone_id=sid, bin="CUT", route="CUT", reason="sorted", valve_status=status,
                      color="blue", clarity=None, model_version="v", wall_time="now", x_mm=1.0 / 3 + i,
                      p_blue=0.1 + i, planned_on_ns=None if status == "no pulse" else 10**18 + i)
        rows.append(StoneRow(**values))
    batch = make_batch_dir(tmp_path, "truth")
    recorder = Recorder(batch, 0.01, 10, 0)
    for r in rows:
        recorder.submit(r)
    recorder.close()
    assert recorded_rows(recorder.db_path) == rows
    assert recorded_rows(batch / "missing.db") == []  # logged: every stone then counts as unseen


def test_the_worlds_indexes_find_what_a_scan_of_every_stone_and_jet_finds(sim_cfg: config.Config) -> None:
    """A long simulated run looks up stones in view and jets by time; the answers (and their order,
    which the renderer paints in) are a full scan's."""
    m = SimMachine(sim_cfg)
    m.feed(300)
    m.start_at(1_000_000_000)
    w = m.world
    rng = np.random.default_rng(3)
    for i, s in enumerate(w.stones[::3]):  # jets across a third of the stones' passages, some off
        valve = JET_BINS[i % len(JET_BINS)]
        start, end = w.nozzle_passage(s, valve)
        w.open_jet(valve, start - int(rng.integers(0, 20_000_000)), end + int(rng.integers(-5_000_000, 5_000_000)))
    width = w.view_mm[0]
    for t in rng.integers(w.stones[0].t_entry_ns - 10**8, w.last_landing_ns(), 400):
        scan = [(s.sim_id, s.x_mm_at(int(t))) for s in w.stones
                if -s.length_mm < s.x_mm_at(int(t)) < width + s.length_mm]
        assert [(s.sim_id, x) for s, x, _ in w.placed_at(int(t))] == scan
    for s in w.stones:
        assert w.landing(s).bin == scan_landing(w, s, sim_cfg.sim.deflect_overlap), s.sim_id


def scan_landing(w: World, stone: StoneSpec, overlap: float) -> str:
    """World.landing as a scan of every jet (what it was before the index)."""
    for bin_name in sorted(JET_BINS, key=lambda b: w.geometry.nozzle_drop_mm[b]):
        start, end = w.nozzle_passage(stone, bin_name)
        if sum(max(0, min(end, off) - max(start, on)) for on, off in w.jets[bin_name]) >= overlap * (end - start):
            return bin_name
    return "REJECT"
