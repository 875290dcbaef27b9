"""The one place that counts: the run's figures and their Prometheus series together.

The pipeline reports what happened (a pair captured, a pulse refused, a stone
finished) to a `RunCounter`; it updates `RunStats` (read by the run summary,
`sorting/summary.py`, and the progress line, `cli/run.py`) and the daemon's
Prometheus series (`sorterd/metrics.py`) in the same call, so the two can never
disagree.  Some figures exist on one side only, on purpose: `objects` and
`valve_unknown` have no series of their own (`sorterd_stones_total` and
`sorterd_pulses_total{status="unknown"}` carry them), `unreadable_pairs` (replay
only), `not_decided` and `untimed` have none (yet), and the queue depths,
pulse outcomes and the model's info are series only.

Threads: loop thread only.  Every method is called from the event loop (the
pipeline's tasks); the Prometheus client locks its own values for the scrape
thread, and `RunStats` is read by the loop (progress line) or after the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sorterd.metrics import Metrics
from sorterd.quantiles import Samples

# Why a region found in a pair was not decided (segment.Segmentation), and pairs that
# gave no new object at all.
NOT_DECIDED = ("unpaired", "touching_border", "already_decided", "empty_pairs")
STAGES = ("segment", "infer", "decide", "compute", "model_only")
# Not a compute stage: from the toplit exposure to the pulse being handed to the
# valves, including queueing and worker hand-offs (the budget that matters).
LATENCIES = (*STAGES, "exposure_to_pulse", "trigger_to_exposure")


@dataclass
class RunStats:
    """Counters and latency samples for the run summary (loop thread only).

    Bounded by constants, never by the stone count: the rows themselves live in
    the batch's stones.db only, and latencies are `Samples` (exact up to a cap,
    then a histogram; sorterd/quantiles.py states the error bound).  A daemon
    that sorts for days holds the same few kilobytes here as after a minute.
    """

    captures: int = 0
    objects: int = 0
    clusters: int = 0
    flagged: int = 0
    deadline_misses: int = 0
    conflicts: int = 0
    pairs_dropped: int = 0
    triggers_dropped: int = 0
    camera_failures: int = 0
    gap_triggers: int = 0  # triggers lost while the camera was away
    unreadable_pairs: int = 0  # replay: recorded pairs whose files could not be read (skipped)
    passed_unseen: int = 0  # trigger edges no decided object explains (the ledger)
    untriggered: int = 0  # decided objects no trigger edge explains
    valve_unknown: int = 0  # pulses whose outcome the controller never reported (link lost)
    late_off_edges: int = 0  # jets closed later than ejection.margin_ms after their planned end
    # stone id -> the bin a neighbour's jet (too late to cancel) may have carried it into
    co_deflection_risks: dict[str, str] = field(default_factory=dict)
    lighting_faults: int = 0  # pairs not lit as §2.2 says (their stones take the safe route)
    # Regions found but not decided, by reason, and pairs in which nothing new was decided:
    # why a run decided fewer objects than it had pairs (never a silent zero).
    not_decided: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOT_DECIDED, 0))
    untimed: int = 0  # decided stones too slow (at rest) or of unknown speed: no jet, default trajectory
    ood: dict[str, Any] = field(default_factory=dict)  # the model's drift watch (sorting/drift.py summary)
    decided: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("CUT", "SELECT", "FLIP", "REJECT"), 0))
    # Where the machine sent them: the decided bin, or REJECT / the safe route after a
    # neighbour conflict, a co-deflection risk or a deadline miss.
    routed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("CUT", "SELECT", "FLIP", "REJECT"), 0))
    finished: int = 0  # stones whose fate is sealed (their rows handed to the recorder)
    # refusal kind (the valve status without its figures) -> stones whose pulse the valves refused
    refusal_kinds: dict[str, int] = field(default_factory=dict)
    latency_s: dict[str, Samples] = field(default_factory=lambda: {s: Samples(floor=1e-9) for s in LATENCIES})


class RunCounter:
    """Counts one run's events into `stats` and `metrics` at once (loop thread only)."""

    def __init__(self, metrics: Metrics) -> None:
        self.stats = RunStats()
        self.metrics = metrics

    # -- triggers and captures ------------------------------------------------

    def trigger_dropped(self) -> None:
        """A trigger edge found the trigger queue full."""
        self.stats.triggers_dropped += 1
        self.metrics.overflow.labels("trigger").inc()

    def captured(self, trigger_to_exposure_s: float) -> None:
        """A frame pair was captured this long after its trigger edge."""
        self.stats.latency_s["trigger_to_exposure"].append(trigger_to_exposure_s)
        self.metrics.trigger_to_exposure.observe(trigger_to_exposure_s)
        self.stats.captures += 1
        self.metrics.captures.inc()

    def pair_dropped(self) -> None:
        """A captured pair found the pair queue full."""
        self.stats.pairs_dropped += 1
        self.metrics.overflow.labels("pairs").inc()

    def lighting_fault(self) -> None:
        """A pair whose strobes were refused or not lit as §2.2 says."""
        self.stats.lighting_faults += 1
        self.metrics.lighting_faults.inc()

    def camera_failure(self) -> None:
        self.stats.camera_failures += 1
        self.metrics.camera_failures.inc()

    def unreadable_pair(self) -> None:
        """Replay: a recorded pair's files could not be read; it was skipped (no series:
        a replay is a bench run, not the service)."""
        self.stats.unreadable_pairs += 1

    def not_decided(self, skipped: dict[str, int], empty: bool) -> None:
        """A pair's regions that were not decided (by reason); `empty`: it gave no new object."""
        for reason, n in skipped.items():
            self.stats.not_decided[reason] += n
        self.stats.not_decided["empty_pairs"] += int(empty)

    def untimed(self) -> None:
        """A decided stone had no usable speed: no jet could be timed for it."""
        self.stats.untimed += 1

    def gap_triggers(self, n: int) -> None:
        """Triggers (stones) lost while the camera was away."""
        self.stats.gap_triggers += n
        self.metrics.camera_gap_triggers.inc(n)

    # -- the trigger ledger ---------------------------------------------------

    def passed_unseen(self, n: int) -> None:
        self.stats.passed_unseen += n
        self.metrics.passed_unseen.inc(n)

    def untriggered(self, n: int) -> None:
        self.stats.untriggered += n
        self.metrics.untriggered.inc(n)

    # -- latencies --------------------------------------------------------------

    def stage_latencies(self, segment_s: float, infer_s: float, decide_s: float, model_s: float) -> None:
        """One classified object's compute stages (the summary's samples and the histogram)."""
        values = {"segment": segment_s, "infer": infer_s, "decide": decide_s,
                  "compute": segment_s + infer_s + decide_s, "model_only": model_s}
        for stage, v in values.items():
            self.stats.latency_s[stage].append(v)
            self.metrics.stage.labels(stage).observe(v)

    def exposure_to_pulse(self, seconds: float) -> None:
        """From an object's toplit exposure to its pulse handed to the valves."""
        self.stats.latency_s["exposure_to_pulse"].append(seconds)
        self.metrics.exposure_to_pulse.observe(seconds)

    # -- decisions and pulses -----------------------------------------------

    def decided_object(self, cluster: bool, flagged: bool) -> None:
        """An object was decided (its bin is counted when it is finished)."""
        self.stats.objects += 1
        if cluster:
            self.stats.clusters += 1
            self.metrics.clusters.inc()
        if flagged:
            self.stats.flagged += 1
            self.metrics.flagged.inc()

    def conflict(self) -> None:
        """A stone sent the safe route because a jet would also catch a neighbour."""
        self.stats.conflicts += 1
        self.metrics.conflicts.inc()

    def co_deflection_risk(self, stone_id: str, into: str) -> None:
        """A neighbour's jet, too late to cancel, may carry `stone_id` into bin `into`."""
        self.stats.co_deflection_risks[stone_id] = into
        self.metrics.co_deflection_risks.inc()

    def pulse_outcome(self, valve: str, status: str) -> None:
        """The valves reported a pulse's fate (`fired`, `refused: ...`, `unknown: ...`)."""
        self.metrics.pulses.labels(valve, status.split(":")[0]).inc()

    def valve_unknown(self) -> None:
        """A pulse whose outcome the controller never reported (its stone is flagged)."""
        self.stats.valve_unknown += 1

    def late_off_edge(self) -> None:
        self.stats.late_off_edges += 1
        self.metrics.late_off_edges.inc()

    def deadline_miss(self) -> None:
        self.stats.deadline_misses += 1
        self.metrics.deadline_misses.inc()

    def finished(self, bin_name: str, route: str, valve_status: str = "") -> None:
        """A stone's fate is sealed: decided `bin_name`, sent to `route`; `valve_status` is its row's.
        `sorterd_stones_total{bin}` counts the decided bin, like the summary's `decided`."""
        self.stats.finished += 1
        self.stats.decided[bin_name] += 1
        self.stats.routed[route] += 1
        if valve_status.startswith("refused"):
            kind = refusal_kind(valve_status)
            self.stats.refusal_kinds[kind] = self.stats.refusal_kinds.get(kind, 0) + 1
        self.metrics.stones.labels(bin_name).inc()

    # -- gauges and info ------------------------------------------------------

    def queue_depth(self, queue: str, depth: int) -> None:
        self.metrics.queue_depth.labels(queue).set(depth)

    def model(self, version: str, sha256: str) -> None:
        """sorterd_model_info{version, release, sha256}: release is N of a store release ("<v>@r<N>"), else ''."""
        release = version.rpartition("@r")[2] if "@r" in version else ""
        self.metrics.model.info({"version": version, "release": release, "sha256": sha256})

    def ood(self, over: bool, share: float, alarmed: bool) -> None:
        """One scored stone of the drift watch: its series (the summary's section is the watch's
        own `summary()`, taken once when the run ends)."""
        if over:
            self.metrics.ood_stones.inc()
        self.metrics.ood_share.set(share)
        self.metrics.ood_alarm.set(1.0 if alarmed else 0.0)


def refusal_kind(status: str) -> str:
    """A refusal's kind, without its figures ("refused: late at fire (0.31 ms)" -> "refused: late at fire")."""
    return re.split(r" \(|\d", status)[0].rstrip(" :(-.")
