"""The run summary (`sorterd run --json PATH`): stable keys, more may be added.

For a simulated run the world knows the truth: every fed stone's class, size
and where it physically landed.  Rows are matched to the world's stones by
position at their exposure instant (a cluster row covers every stone in it).

accuracy.bin and accuracy.cost_weighted compare where stones *landed* with
their §8.2 true bin (what the dealer gets); accuracy.color / .clarity are the
classifier's, over classified stones.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from sorterd.config import BINS, Config
from sorterd.decide import class_bin
from sorterd.pipeline import LATENCIES, STAGES, RunStats
from sorterd.record import StoneRow
from sorterd.sim.world import World

# §8.2 cost matrix, cost[true][landed], bins in BINS order (CUT, SELECT, FLIP, REJECT).
COST = np.array([
    [0, 3, 10, 8],
    [5, 0, 3, 4],
    [7, 1, 0, 2],
    [1, 1, 1, 0],
])


def cost_weighted_accuracy(true_bins: list[str], got_bins: list[str]) -> float:
    """§8.2: 1 - total cost / worst possible cost for these stones."""
    if not true_bins:
        return float("nan")
    t = [BINS.index(b) for b in true_bins]
    g = [BINS.index(b) for b in got_bins]
    total = sum(COST[i, j] for i, j in zip(t, g, strict=True))
    worst = sum(COST[i].max() for i in t)
    return 1.0 - total / worst


def percentiles_ms(samples: Any) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p99": None}
    a = np.asarray(samples) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4)}


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


def summarize(cfg: Config, stats: RunStats, rows: list[StoneRow], world: World | None,
              model_version: str, wall_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "objects_decided": len(rows),
        "captures": stats.captures,
        "clusters": stats.clusters,
        "neighbour_conflicts": stats.conflicts,
        "deadline_misses": stats.deadline_misses,
        "flagged": stats.flagged,
        "flagged_rate": round(stats.flagged / len(rows), 4) if rows else 0.0,
        "pairs_dropped": stats.pairs_dropped,
        "camera_failures": stats.camera_failures,
        "camera_gap_triggers": stats.gap_triggers,
        "decided": dict(stats.decided),
        "latency_ms": {s: percentiles_ms(stats.latency_s[s]) for s in LATENCIES},
        "model": {"version": model_version},
        "wall_s": round(wall_s, 2),
    }
    if world is not None:
        out.update(_sim_truth(cfg, world, rows))
    return out


def _sim_truth(cfg: Config, world: World, rows: list[StoneRow]) -> dict[str, Any]:
    owner = match_rows(world, rows)
    landed = {s.sim_id: world.landing(s).bin for s in world.stones}
    true_bin = {s.sim_id: class_bin(s.color, s.clarity, s.size_mm, cfg.decision) for s in world.stones}
    as_decided = sum(1 for s in world.stones if s.sim_id in owner and owner[s.sim_id].bin == landed[s.sim_id])
    classified = [(s, owner[s.sim_id]) for s in world.stones
                  if s.sim_id in owner and owner[s.sim_id].color is not None and not owner[s.sim_id].cluster]
    n = len(world.stones)
    ids = [s.sim_id for s in world.stones]
    return {
        "stones_fed": n,
        "stones_seen": len(owner),
        "bins": {b: sum(1 for i in ids if landed[i] == b) for b in BINS},
        "landed_as_decided_rate": round(as_decided / n, 5) if n else 0.0,
        "accuracy": {
            "bin": _rate(sum(1 for i in ids if landed[i] == true_bin[i]), n),
            "color": _rate(sum(1 for s, r in classified if r.color == s.color), len(classified)),
            "clarity": _rate(sum(1 for s, r in classified if r.clarity == s.clarity), len(classified)),
            "cost_weighted": round(cost_weighted_accuracy([true_bin[i] for i in ids], [landed[i] for i in ids]), 5),
        },
        "unseen_stones": n - len(owner),
    }


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 5) if n else None


def format_text(s: dict[str, Any]) -> str:
    lines = []
    if "stones_fed" in s:
        lines.append(f"stones fed {s['stones_fed']}, seen {s['stones_seen']}, objects decided {s['objects_decided']}"
                     f" ({s['clusters']} clusters), captures {s['captures']}")
        lines.append("landed: " + "  ".join(f"{b} {s['bins'][b]}" for b in BINS)
                     + f"   landed as decided {s['landed_as_decided_rate']:.2%}")
        a = s["accuracy"]
        lines.append(f"accuracy vs truth: bin {_pct(a['bin'])}  color {_pct(a['color'])}  "
                     f"clarity {_pct(a['clarity'])}  cost-weighted {a['cost_weighted']:.3f}")
    else:
        lines.append(f"objects decided {s['objects_decided']} ({s['clusters']} clusters)")
    lines.append(f"flagged {s['flagged']} ({s['flagged_rate']:.1%})  deadline misses {s['deadline_misses']}  "
                 f"neighbour conflicts {s['neighbour_conflicts']}  pairs dropped {s['pairs_dropped']}"
                 + (f"  camera lost {s['camera_failures']}x ({s['camera_gap_triggers']} triggers in the gap)"
                    if s["camera_failures"] else ""))
    lat = s["latency_ms"]
    lines.append("latency ms p50/p99: " + "  ".join(
        f"{k} {lat[k]['p50']}/{lat[k]['p99']}" for k in STAGES))
    lines.append(f"model {s['model']['version']}   wall time {s['wall_s']} s")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
