"""The run summary (`sorterd run --json PATH`): stable keys, more may be added.

This module builds what the daemon itself knows (its counts, latencies, the
valve backend's figures).  What only an observer outside the daemon can know
-- every fed stone's true class and where it physically landed, the valve
edges seen with the true clock -- comes in as a RunTruth, which the
composition root hands in for a simulated run (the simulator's truth module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from sorterd.config import Config
from sorterd.domain import BINS
from sorterd.parts.lights import Lights
from sorterd.parts.valves import Valves
from sorterd.quantiles import Samples
from sorterd.sorting.stats import LATENCIES, STAGES, RunStats


def percentiles_ms(samples: Samples) -> dict[str, float | None]:
    return _p50_p99(samples, lambda a: a * 1e3, 4)


def _p50_p99(samples: Samples, unit: Callable[[np.ndarray], np.ndarray], digits: int,
             absolute: bool = False) -> dict[str, float | None]:
    """p50/p99 in the summary's unit: exact while the series is (every normal run), else
    from its bounded histogram, within sorterd.quantiles.REL_ERROR of the exact value."""
    if not samples:
        return {"p50": None, "p99": None}
    exact = samples.exact_array()
    if exact is not None:
        a = unit(np.abs(exact) if absolute else exact)
        p50, p99 = np.percentile(a, 50), np.percentile(a, 99)
    else:
        p50, p99 = unit(np.array([samples.quantile(q, absolute) for q in (0.5, 0.99)]))
    return {"p50": round(float(p50), digits), "p99": round(float(p99), digits)}


class ValveTiming(Protocol):
    """Valve edges observed from outside the host (the simulated machine watching the controller's pins)."""

    def summary(self, planned: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
        """sync_error_us, fire_error_us and valve_controller against planned (valve, on_ns, off_ns) pulses."""
        ...


class RunTruth(Protocol):
    """What an observer outside the daemon knows of a run; only the simulator has one.

    It brings its own copy of the run's records (the simulator reads them back from
    the batch's stones.db): the daemon keeps no rows, only running counters."""

    @property
    def valve_trace(self) -> ValveTiming | None: ...

    def stones_summary(self, risks: dict[str, str]) -> dict[str, Any]:
        """The truth section: stones_fed, stones_seen, bins, landed_as_*_rate, accuracy, unseen_*, misrouted."""
        ...

    def planned_pulses(self) -> list[tuple[str, int, int]]:
        """(valve, on_ns, off_ns) of every pulse the records say was planned."""
        ...


def summarize(cfg: Config, stats: RunStats, truth: RunTruth | None,
              model_version: str, wall_s: float, valves: Valves | None = None,
              lights: Lights | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "objects_decided": stats.finished,
        "captures": stats.captures,
        "clusters": stats.clusters,
        "neighbour_conflicts": stats.conflicts,
        "deadline_misses": stats.deadline_misses,
        "flagged": stats.flagged,
        "flagged_rate": round(stats.flagged / stats.finished, 4) if stats.finished else 0.0,
        "pairs_dropped": stats.pairs_dropped,
        "camera_failures": stats.camera_failures,
        "camera_gap_triggers": stats.gap_triggers,
        "unreadable_pairs": stats.unreadable_pairs,
        "triggers_dropped": stats.triggers_dropped,
        "passed_unseen": stats.passed_unseen,
        "co_deflection_risks": len(stats.co_deflection_risks),
        "valve_unknown": stats.valve_unknown,
        "late_off_edges": stats.late_off_edges,
        "untriggered": stats.untriggered,
        "lighting_faults": stats.lighting_faults,
        "not_decided": dict(stats.not_decided),
        "untimed": stats.untimed,
        "decided": dict(stats.decided),
        "routed": dict(stats.routed),
        "latency_ms": {s: percentiles_ms(stats.latency_s[s]) for s in LATENCIES},
        "model": {"version": model_version},
        "ood": dict(stats.ood),
        "wall_s": round(wall_s, 2),
    }
    if truth is not None:
        out.update(truth.stones_summary(stats.co_deflection_risks))
    trace, planned = (truth.valve_trace, truth.planned_pulses()) if truth is not None else (None, [])
    out.update(valve_summary(stats.refusal_kinds, trace, planned, valves))
    timing = lights.timing() if lights is not None else None
    if timing is not None:
        out.update(timing)  # strobe_error_us, strobe_refusals
    return out


def valve_summary(refusals: Mapping[str, int], trace: ValveTiming | None,
                  planned: Sequence[tuple[str, int, int]] = (), valves: Valves | None = None) -> dict[str, Any]:
    """Valve timing and faults, where a backend or the simulated controller has them.

    sync_error_us / fire_error_us (|error| p50, p99, max; bias = signed median)
    come from the simulated machine watching the controller's pins with the
    true clock relation (a RunTruth's valve_trace), or else from the backend's own
    truth samples, matched against the `planned` pulses (valve, on_ns, off_ns).
    valve_refusals counts stones whose pulse the valve backend refused (they took
    the safe route; `refusals`: kind -> stones, RunStats.refusal_kinds);
    watchdog_trips and reconnects come from the controller (simulated) or the backend.
    """
    out: dict[str, Any] = {}
    st = valves.stats() if valves is not None else None
    if trace is None and st is None:
        return out
    out["valve_refusals"] = sum(refusals.values())
    out["valve_refusal_reasons"] = dict(refusals)
    if trace is not None:
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


def _us(errors_ns: Samples) -> dict[str, float | None]:
    """|error| p50/p99 in microseconds."""
    return _p50_p99(errors_ns, lambda a: a.astype(float) / 1e3, 2, absolute=True)


def _backend_stats(st: Any) -> dict[str, Any]:
    return {
        "backend": st.backend, "state": st.state, "refusals": dict(st.refusals),
        "watchdog_trips": st.watchdog_trips, "reconnects": st.reconnects, "late_at_fire": st.late_at_fire,
        "host_fire_error_us": _us(st.fire_error_ns),
        "clock_rtt_us": None if st.clock_rtt_ns is None else round(st.clock_rtt_ns / 1e3, 1),
        "clock_offset_us": None if st.clock_offset_ns is None else round(st.clock_offset_ns / 1e3, 2),
        "clock_drift_ppm": None if st.clock_drift_ppm is None else round(st.clock_drift_ppm, 2),
    }


# Counts printed only when not zero: (summary key, label).
FAULT_COUNTS = (("lighting_faults", "lighting faults"), ("passed_unseen", "passed unseen"),
                ("untriggered", "untriggered"), ("co_deflection_risks", "co-deflection risks"),
                ("valve_unknown", "valve outcomes unknown"), ("late_off_edges", "late off edges"),
                ("triggers_dropped", "triggers dropped"), ("unreadable_pairs", "unreadable recorded pairs (skipped)"),
                ("untimed", "too slow to time a jet (default trajectory)"))


def format_text(s: dict[str, Any]) -> str:
    lines = []
    if "stones_fed" in s:
        lines.append(f"stones fed {s['stones_fed']}, seen {s['stones_seen']}, objects decided {s['objects_decided']}"
                     f" ({s['clusters']} clusters), captures {s['captures']}")
        feed = s.get("feed") or {}
        if feed.get("achieved_per_s") is not None:
            lines.append(f"feed rate: requested {feed['requested_per_s']:g}/s, achieved {feed['achieved_per_s']:g}/s"
                         f" (singulation allows ~{feed['capacity_per_s']:.0f}/s)")
        if feed.get("warning"):
            lines.append(f"WARNING: {feed['warning']}")
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
    short = shortfall(s)
    if short:
        lines.append(short)
    lat = s["latency_ms"]
    lines.append("latency ms p50/p99: " + "  ".join(
        f"{k} {_ms(lat[k]['p50'])}/{_ms(lat[k]['p99'])}" for k in STAGES))
    lines.append(f"model {s['model']['version']}   wall time {s['wall_s']} s")
    lines += _ood_lines(s.get("ood"))
    lines += _record_lines(s.get("record"))
    return "\n".join(lines)


def shortfall(s: dict[str, Any]) -> str:
    """'' when the run decided at least one object per pair; else the line saying by how
    much it fell short and why (the regions found but not decided, by reason)."""
    decided, pairs = s["objects_decided"], s["captures"]
    if decided >= pairs:
        return ""
    why = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in s["not_decided"].items() if n) or "no reason counted"
    return f"decided {decided} objects from {pairs} pairs: not decided: {why}"
def _ood_lines(ood: dict[str, Any] | None) -> list[str]:
    """The drift watch (sorting/drift.py): the alarm first, loud, if the batch drifted."""
    if not ood or not ood.get("gate"):
        return []
    line = (f"out of distribution: {ood['over_limit']} of {ood['stones_scored']} stones "
            f"({ood['over_limit_rate']:.1%}) to SELECT, worst window {ood['worst_window_share']:.1%}")
    return [line] + ([f"ALARM: {ood['alarm']}"] if ood.get("alarm") else [])


def _ms(v: float | None) -> str:
    """A latency in the text summary: one decimal (the JSON keeps four)."""
    return "-" if v is None else f"{v:.1f}"


def _record_lines(rec: dict[str, Any] | None) -> list[str]:
    """The production log's losses, only when there are any (a full or failing disk)."""
    if not rec or not (any(rec["lost"].values()) or rec["rows_spilled"]):
        return []
    lost = "  ".join(f"{k} {n}" for k, n in rec["lost"].items() if n) or "none"
    return [f"record: NOT KEPT {lost}   spilled rows {rec['rows_spilled']}   images skipped for "
            f"low disk {rec['images_low_disk']}   write errors {rec['errors']}"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
