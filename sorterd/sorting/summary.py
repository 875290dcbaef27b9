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
import re
from typing import Any

import numpy as np

from sorterd.config import Config
from sorterd.domain import BINS, cost_weighted_accuracy
from sorterd.sim.world import World
from sorterd.sorting.decide import class_bin
from sorterd.sorting.pipeline import LATENCIES, STAGES, RunStats
from sorterd.sorting.record import StoneRow


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
              model_version: str, wall_s: float, valves: Any = None, lights: Any = None) -> dict[str, Any]:
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
        "triggers_dropped": stats.triggers_dropped,
        "passed_unseen": stats.passed_unseen,
        "co_deflection_risks": len(stats.co_deflection_risks),
        "valve_unknown": stats.valve_unknown,
        "late_off_edges": stats.late_off_edges,
        "untriggered": stats.untriggered,
        "lighting_faults": stats.lighting_faults,
        "decided": dict(stats.decided),
        "latency_ms": {s: percentiles_ms(stats.latency_s[s]) for s in LATENCIES},
        "model": {"version": model_version},
        "wall_s": round(wall_s, 2),
    }
    if world is not None:
        out.update(_sim_truth(cfg, world, rows, stats.co_deflection_risks))
    out.update(valve_summary(rows, world, valves))
    if hasattr(lights, "timing"):
        out.update(lights.timing())  # strobe_error_us, strobe_refusals
    return out


def valve_summary(rows: list[StoneRow], world: World | None, valves: Any = None) -> dict[str, Any]:
    """Valve timing and faults, where a backend or the simulated controller has them.

    sync_error_us / fire_error_us (|error| p50, p99, max; bias = signed median)
    come from the simulated machine watching the controller's pins with the
    true clock relation (world.valve_trace), or else from the backend's own
    truth samples.  valve_refusals counts stones whose pulse the valve
    backend refused (they took the safe route); watchdog_trips and reconnects
    come from the controller (simulated) or the backend.
    """
    out: dict[str, Any] = {}
    trace = getattr(world, "valve_trace", None) if world is not None else None
    st = valves.stats() if valves is not None and hasattr(valves, "stats") else None
    if trace is None and st is None:
        return out
    refused = [r.valve_status for r in rows if r.valve_status.startswith("refused")]
    out["valve_refusals"] = len(refused)
    out["valve_refusal_reasons"] = _group_reasons(refused)
    if trace is not None:
        # A row's bin is its pulse's valve (a pulse cancelled for a neighbour moved
        # its row to REJECT, and never opened anything).
        planned = [(r.bin, r.planned_on_ns, r.planned_off_ns) for r in rows
                   if r.planned_on_ns is not None and r.planned_off_ns is not None]
        truth = trace.summary(planned)
        out.update(sync_error_us=truth["sync_error_us"], fire_error_us=truth["fire_error_us"],
                   valve_controller=truth["valve_controller"])
        out["watchdog_trips"] = truth["valve_controller"]["watchdog_trips"]
        out["reconnects"] = truth["valve_controller"]["reconnects"]
    if st is not None:
        out["valves"] = _backend_stats(st)
        out.setdefault("sync_error_us", _us(st.sync_error_ns))
        out.setdefault("fire_error_us", _us(st.true_fire_errors()))
        out.setdefault("watchdog_trips", st.watchdog_trips)
        out.setdefault("reconnects", st.reconnects)
    return out


def _group_reasons(statuses: list[str]) -> dict[str, int]:
    groups: dict[str, int] = {}
    for text in statuses:
        key = re.split(r" \(|\d", text)[0].rstrip(" :(-.")  # the kind, without its figures
        groups[key] = groups.get(key, 0) + 1
    return groups


def _us(errors_ns: Any) -> dict[str, float | None]:
    if not errors_ns:
        return {"p50": None, "p99": None}
    a = np.abs(np.asarray(errors_ns, dtype=float)) / 1e3
    return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2)}


def _backend_stats(st: Any) -> dict[str, Any]:
    return {
        "backend": st.backend, "state": st.state, "refusals": dict(st.refusals),
        "watchdog_trips": st.watchdog_trips, "reconnects": st.reconnects, "late_at_fire": st.late_at_fire,
        "host_fire_error_us": _us(st.fire_error_ns),
        "clock_rtt_us": None if st.clock_rtt_ns is None else round(st.clock_rtt_ns / 1e3, 1),
        "clock_offset_us": None if st.clock_offset_ns is None else round(st.clock_offset_ns / 1e3, 2),
        "clock_drift_ppm": None if st.clock_drift_ppm is None else round(st.clock_drift_ppm, 2),
    }


def _sim_truth(cfg: Config, world: World, rows: list[StoneRow], risks: dict[str, str] | None = None) -> dict[str, Any]:
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


# Counts printed only when not zero: (summary key, label).
FAULT_COUNTS = (("lighting_faults", "lighting faults"), ("passed_unseen", "passed unseen"),
                ("untriggered", "untriggered"), ("co_deflection_risks", "co-deflection risks"),
                ("valve_unknown", "valve outcomes unknown"), ("late_off_edges", "late off edges"),
                ("triggers_dropped", "triggers dropped"))


def format_text(s: dict[str, Any]) -> str:
    lines = []
    if "stones_fed" in s:
        lines.append(f"stones fed {s['stones_fed']}, seen {s['stones_seen']}, objects decided {s['objects_decided']}"
                     f" ({s['clusters']} clusters), captures {s['captures']}")
        lines.append("landed: " + "  ".join(f"{b} {s['bins'][b]}" for b in BINS)
                     + f"   landed as decided {s['landed_as_decided_rate']:.2%}"
                     + f", as routed {s['landed_as_routed_rate']:.2%}")
        a = s["accuracy"]
        lines.append(f"accuracy vs truth: bin {_pct(a['bin'])}  color {_pct(a['color'])}  "
                     f"clarity {_pct(a['clarity'])}  cost-weighted {a['cost_weighted']:.3f}")
    else:
        lines.append(f"objects decided {s['objects_decided']} ({s['clusters']} clusters)")
    lines.append(f"flagged {s['flagged']} ({s['flagged_rate']:.1%})  deadline misses {s['deadline_misses']}  "
                 f"neighbour conflicts {s['neighbour_conflicts']}  pairs dropped {s['pairs_dropped']}"
                 + (f"  camera lost {s['camera_failures']}x ({s['camera_gap_triggers']} triggers in the gap)"
                    if s["camera_failures"] else "")
                 + "".join(f"  {label} {s[key]}" for key, label in FAULT_COUNTS if s[key]))
    if "fire_error_us" in s:
        sy, fi = s["sync_error_us"], s["fire_error_us"]
        lines.append(f"valve timing us p50/p99: sync {sy['p50']}/{sy['p99']}  fire {fi['p50']}/{fi['p99']}  "
                     f"valve refusals {s['valve_refusals']}  watchdog trips {s['watchdog_trips']}  "
                     f"reconnects {s['reconnects']}")
    lat = s["latency_ms"]
    lines.append("latency ms p50/p99: " + "  ".join(
        f"{k} {lat[k]['p50']}/{lat[k]['p99']}" for k in STAGES))
    lines.append(f"model {s['model']['version']}   wall time {s['wall_s']} s")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
