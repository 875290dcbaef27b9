"""The simulated machine's truth for the run summary (`sorterd run --json PATH`).

For a simulated run the world knows the truth: every fed stone's class, size
and where it physically landed.  Rows are matched to the world's stones by
position at their exposure instant (a cluster row covers every stone in it).

The rows are the batch's records, read back from its stones.db once the
recorder has closed (`SimTruth.from_batch`): the daemon keeps none in memory,
so what is compared with the world is exactly what the records say.

accuracy.bin and accuracy.cost_weighted compare where stones *landed* with
their §8.2 true bin (what the dealer gets); accuracy.color / .clarity are the
classifier's, over classified stones.  The daemon's own figures are in
sorterd.sorting.summary, which adds this section when a run has a truth.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
from pathlib import Path
from typing import Any

from sorterd.config import Config
from sorterd.domain import BINS, JET_BINS, cost_weighted_accuracy
from sorterd.sim.firmware import ValveTrace
from sorterd.sim.world import World
from sorterd.sorting.decide import class_bin
from sorterd.sorting.record import COLUMNS, StoneRow

log = logging.getLogger(__name__)


class SimTruth:
    """What the simulated world knows of a run (sorterd.sorting.summary.RunTruth)."""

    def __init__(self, cfg: Config, world: World, rows: list[StoneRow] | None = None) -> None:
        self.cfg = cfg
        self.world = world
        self.rows = rows or []

    @classmethod
    def from_batch(cls, cfg: Config, world: World, db_path: Path | None) -> SimTruth:
        """The truth against the batch's records (stones.db, read once the recorder has closed)."""
        return cls(cfg, world, recorded_rows(db_path) if db_path is not None else [])

    @property
    def valve_trace(self) -> ValveTrace | None:
        """The simulated controller's pins, watched with the true clock (None with ideal `sim` valves)."""
        trace: ValveTrace | None = self.world.valve_trace
        return trace

    def stones_summary(self, risks: dict[str, str]) -> dict[str, Any]:
        return sim_truth(self.cfg, self.world, self.rows, risks)

    def planned_pulses(self) -> list[tuple[str, int, int]]:
        return planned_pulses(self.rows)


def planned_pulses(rows: list[StoneRow]) -> list[tuple[str, int, int]]:
    """(valve, on_ns, off_ns) of every pulse sent.  Its valve is the row's route (a neighbour
    conflict may route a stone to the safe route, not its decided bin), or its bin once a
    refusal moved the route to REJECT; a pulse cancelled for a neighbour never opened anything."""
    return [(r.route if r.route in JET_BINS else r.bin, r.planned_on_ns, r.planned_off_ns) for r in rows
            if r.planned_on_ns is not None and r.planned_off_ns is not None and r.valve_status != "cancelled"]


def recorded_rows(db_path: Path) -> list[StoneRow]:
    """Every stone row of a batch's stones.db, in the order they were finished (rowid: the writer
    inserts them as the pipeline hands them over); none (logged) if it cannot be read."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            got = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM stones ORDER BY rowid").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.error("simulated truth: cannot read the records in %s (%s): every stone counts as unseen", db_path, exc)
        return []
    return [StoneRow(**dict(zip(COLUMNS, r, strict=True))) for r in got]


def match_rows(world: World, rows: list[StoneRow]) -> dict[int, StoneRow]:
    """World stone id -> the row that decided it."""
    stones = sorted(world.stones, key=lambda s: s.t_entry_ns)
    entries = [s.t_entry_ns for s in stones]
    owner: dict[int, StoneRow] = {}
    for row in rows:
        t = row.t_toplit_ns
        # Only stones that entered the view within the last second can be in it.
        lo, hi = bisect.bisect_left(entries, t - 1_000_000_000), bisect.bisect_right(entries, t)
        reach = max(1.5, row.length_mm / 2 + 0.5)
        near = [(abs(s.x_mm_at(t) - row.x_mm), s) for s in stones[lo:hi]
                if abs(s.x_mm_at(t) - row.x_mm) < reach and abs(s.y_mm - row.y_mm) < 1.5]
        if not near:
            continue
        members = [s for _, s in near] if row.cluster else [min(near, key=lambda p: p[0])[1]]
        for s in members:
            owner.setdefault(s.sim_id, row)
    return owner


def sim_truth(cfg: Config, world: World, rows: list[StoneRow], risks: dict[str, str] | None = None) -> dict[str, Any]:
    owner = match_rows(world, rows)
    landed = {s.sim_id: world.landing(s).bin for s in world.stones}
    true_bin = {s.sim_id: class_bin(s.color, s.clarity, s.size_mm, cfg.decision) for s in world.stones}
    as_decided = sum(1 for s in world.stones if s.sim_id in owner and owner[s.sim_id].bin == landed[s.sim_id])
    # Below 100 % landed as routed, a jet missed or hit the wrong stone: a fault no record explains.
    misrouted = [s for s in world.stones if landed[s.sim_id] not in _may_land(owner.get(s.sim_id), risks or {})]
    classified = [(s, owner[s.sim_id]) for s in world.stones
                  if s.sim_id in owner and owner[s.sim_id].color is not None and not owner[s.sim_id].cluster]
    n = len(world.stones)
    ids = [s.sim_id for s in world.stones]
    return {
        "stones_fed": n,
        # Requested vs fed rate and what caps it (a loud warning when the rate asked cannot be fed).
        "feed": world.feed_report(),
        "stones_seen": len(owner),
        "bins": {b: sum(1 for i in ids if landed[i] == b) for b in BINS},
        "landed_as_decided_rate": round(as_decided / n, 5) if n else 0.0,
        "landed_as_routed_rate": round(1 - len(misrouted) / n, 5) if n else 0.0,
        "accuracy": {
            "bin": _rate(sum(1 for i in ids if landed[i] == true_bin[i]), n),
            "color": _rate(sum(1 for s, r in classified if r.color == s.color), len(classified)),
            "clarity": _rate(sum(1 for s, r in classified if r.clarity == s.clarity), len(classified)),
            "cost_weighted": round(cost_weighted_accuracy([true_bin[i] for i in ids], [landed[i] for i in ids]), 5),
        },
        "unseen_stones": n - len(owner),
        # What the daemon's trigger ledger can know of them: beam interruptions none of whose
        # stones was decided (touching stones break the beam once).  Sim trigger only.
        "unseen_beam_events": (sum(1 for _, stones in world.beam_events(cfg.trigger.front_mm or 0.0)
                                   if not any(s.sim_id in owner for s in stones))
                               if cfg.trigger.type == "sim" else None),
        # The first few stones that landed where they were not routed, to look up in stones.db.
        "misrouted": [_misrouted(s.sim_id, owner.get(s.sim_id), landed[s.sim_id]) for s in misrouted[:10]],
    }


def _may_land(row: StoneRow | None, risks: dict[str, str]) -> set[str]:
    """Where the records say a stone went: its route (a decided bin, or a safe route after a
    refusal or a fault); REJECT, the default trajectory, for one never seen; also REJECT when
    its pulse's outcome never came back; also the bin of a jet it was flagged as at risk from."""
    if row is None:
        return {"REJECT"}
    bins = {row.route}
    if row.valve_status.startswith("unknown"):
        bins.add("REJECT")
    if row.stone_id in risks:
        bins.add(risks[row.stone_id])
    return bins


def _misrouted(sim_id: int, row: StoneRow | None, landed: str) -> dict[str, Any]:
    return {"sim_id": sim_id, "stone_id": row.stone_id if row else None, "route": row.route if row else "REJECT",
            "landed": landed, "valve_status": row.valve_status if row else "unseen"}


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 5) if n else None
