"""Prometheus metrics (prometheus-client), one registry per daemon.

Names follow Prometheus conventions (https://prometheus.io/docs/practices/naming/): base units
(seconds, ratios), counters end in `_total` (the collector families below are named without it;
prometheus-client appends it), histograms in `_seconds` with explicit buckets fine enough for the
sub-millisecond stages (10 us steps at the bottom).  `monitoring/` holds the scrape config, the
alert rules and the Grafana dashboard that use these names; tests/test_prometheus.py has a real
Prometheus scrape a simulated sorter and `promtool check metrics` the exposition.

Renamed (issue 15): `sorterd_valve_clock_drift_ppm` -> `sorterd_valve_clock_drift_ratio` (base
unit: 37 ppm reads 3.7e-05).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sorterd.parts.inference import Model
from sorterd.parts.valves import Valves

# Stage latencies: decide is ~0.1 ms, segment under 1 ms, infer a few ms; the pulse budget tens of
# ms.  Buckets from 10 us to 1 s, about three per decade below 1 ms and finer where p99s sit.
STAGE_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 4e-4, 5e-4, 7.5e-4,
                   0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0)
# From an exposure to its pulse, and from a trigger to its exposure: ms to tens of ms.
SPAN_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                  0.15, 0.25, 0.5, 1.0)
# How late the event loop wakes a due timer: sub-ms when healthy, up to seconds when something blocks it.
LOOP_LAG_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        # No `*_created` gauge beside every counter and histogram (process-wide, and this
        # process serves one registry): they double the series and nothing here reads them.
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.stones = Counter("sorterd_stones_total", "Objects finished, by decided bin (not by route: a conflict or deadline miss keeps it).",
                              ["bin"], registry=r)
        self.flagged = Counter("sorterd_flagged_total", "Stones flagged for review.", registry=r)
        self.clusters = Counter("sorterd_clusters_total", "Touching stones seen as one object (safe route).", registry=r)
        self.deadline_misses = Counter("sorterd_deadline_misses_total", "Pulses not sent because they would be late.", registry=r)
        self.conflicts = Counter("sorterd_neighbour_conflicts_total", "Stones sent the safe route because a jet would also catch a neighbour.", registry=r)
        self.overflow = Counter("sorterd_queue_overflow_total", "Items that found a full queue, by queue.", ["queue"], registry=r)
        self.camera_failures = Counter("sorterd_camera_failures_total", "Times the camera was lost.", registry=r)
        self.lighting_faults = Counter("sorterd_lighting_faults_total", "Pairs whose strobes were refused, unconfirmed or mistimed (their stones took the safe route).", registry=r)
        self.camera_gap_triggers = Counter("sorterd_camera_gap_triggers_total", "Triggers lost while the camera was away (stones fell to REJECT).", registry=r)
        self.co_deflection_risks = Counter("sorterd_co_deflection_risks_total", "Stones a neighbour's jet, too late to cancel, may have carried into its bin (flagged).", registry=r)
        self.late_off_edges = Counter("sorterd_valve_late_off_edges_total", "Jets closed later than ejection.margin_ms after their planned end (may carry the stone behind).", registry=r)
        self.passed_unseen = Counter("sorterd_stones_passed_unseen_total", "Trigger edges no decided stone explains: stones that passed the camera unseen and fell to REJECT.", registry=r)
        self.untriggered = Counter("sorterd_stones_untriggered_total", "Decided stones whose crossing no trigger edge explains (the trigger missed them).", registry=r)
        self.captures = Counter("sorterd_captures_total", "Frame pairs captured.", registry=r)
        self.pulses = Counter("sorterd_pulses_total", "Valve pulses by outcome.", ["valve", "status"], registry=r)
        self.stage = Histogram("sorterd_stage_seconds", "Per-object compute latency by stage (segment, infer, decide, "
                               "compute = their sum, model_only = the bare model call).", ["stage"],
                               buckets=STAGE_BUCKETS_S, registry=r)
        self.exposure_to_pulse = Histogram(
            "sorterd_exposure_to_pulse_seconds", "From an object's toplit exposure to its pulse handed to the "
            "valves (queueing and hand-offs included): the ejection budget.", buckets=SPAN_BUCKETS_S, registry=r)
        self.trigger_to_exposure = Histogram(
            "sorterd_trigger_to_exposure_seconds", "From a trigger edge to its pair's backlit exposure.",
            buckets=SPAN_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("sorterd_queue_depth", "Items waiting, by queue.", ["queue"], registry=r)
        self.loop_lag = Histogram("sorterd_event_loop_lag_seconds", "How late the event loop woke a timer that was "
                                  "due (sorterd/sorting/looplag.py): what a blocked loop costs every stone.",
                                  buckets=LOOP_LAG_BUCKETS_S, registry=r)
        self.model = Info("sorterd_model", "The active model bundle.", registry=r)
        self.model_swaps = Counter("sorterd_model_swaps_total", "Releases swapped in while running.", registry=r)
        self.model_refusals = Counter("sorterd_model_refusals_total", "Releases refused, by the check that failed.",
                                      ["check"], registry=r)
        self.model_rollbacks = Counter("sorterd_model_rollbacks_total", "Automatic rollbacks by the release health watch.",
                                       registry=r)
        self.ood_stones = Counter("sorterd_ood_stones_total", "Stones over the model's out-of-distribution limit (sent to SELECT, flagged).", registry=r)
        self.ood_share = Gauge("sorterd_ood_batch_share", "Share of the last scored stones over the out-of-distribution limit.", registry=r)
        self.ood_alarm = Gauge("sorterd_ood_alarm", "1 while the batch has drifted outside what the model knows (collect and label stones).", registry=r)
        self.server: Any = None

    def watch_valves(self, valves: Valves) -> None:
        """Expose a valve backend's timing and faults, read at scrape time (none for backends without)."""
        self.registry.register(ValveCollector(valves))

    def watch_inference(self, model: Model) -> None:
        """Expose which backend runs the model now (tensorrt once its engine is live, onnxruntime before
        and after a fall-back), read at scrape time: sorterd_inference_backend_info{backend=...} 1."""
        self.registry.register(InferenceCollector(model))

    def watch_recorder(self, recorder: RecordFigures) -> None:
        """Expose what the production log lost and whether its writer is stalled, read at scrape time."""
        self.registry.register(RecordCollector(recorder))

    def watch_outbox(self, outbox: OutboxFigures) -> None:
        """Expose the link's outbox (its depth, what it dropped), read at scrape time."""
        self.registry.register(OutboxCollector(outbox))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        self.server, bound = serve_registry(self.registry, host, port)
        return bound

    def close(self) -> None:
        close_server(self.server)


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """A Prometheus endpoint for `registry` on host:port (0 = any free port): (server, bound port).
    The sorter's and the trainer's metrics both serve through here."""
    result = start_http_server(port, addr=host, registry=registry)
    server = result[0] if isinstance(result, tuple) else None
    return server, int(server.server_port) if server is not None else port


def close_server(server: Any) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


class RecordFigures(Protocol):
    """What a recorder (sorterd.sorting.record.Recorder) tells about its disk."""

    errors: int
    buffered: int

    @property
    def stalled(self) -> bool: ...

    def lost_counts(self) -> dict[str, int]: ...


class RecordCollector:
    """The recorder's counters (kept by its writer threads) as Prometheus metrics, read at scrape time."""

    def __init__(self, recorder: RecordFigures) -> None:
        self.recorder = recorder

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        r = self.recorder
        lost = CounterMetricFamily(
            "sorterd_record_lost", "Records not kept (full or failing disk, record.min_free_mb, a full queue, "
            "the stop's deadline), by what: rows, unseen, decisions; thumbnails, flagged_images, pairs.",
            labels=["what"])
        for what, n in r.lost_counts().items():
            lost.add_metric([what], float(n))
        yield lost
        yield CounterMetricFamily("sorterd_record_write_errors", "Writes the disk refused (database "
                                  "transactions, images).", value=float(r.errors))
        yield GaugeMetricFamily("sorterd_record_writer_stalled", "1 while the database refuses writes: rows "
                                "wait in a bounded buffer and are retried.", value=float(r.stalled))
        yield GaugeMetricFamily("sorterd_record_buffered_rows", "Rows the database refused, held for a retry.",
                                value=float(r.buffered))


class OutboxFigures(Protocol):
    """What the link's outbox (sorterd.link.outbox.Outbox) tells about itself."""

    def depth(self) -> tuple[int, int]: ...

    def dropped_counts(self) -> dict[str, int]: ...


class OutboxCollector:
    """The outbox's depth and drops (kept by its thread) as Prometheus metrics, read at scrape time."""

    def __init__(self, outbox: OutboxFigures) -> None:
        self.outbox = outbox

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        entries, size = self.outbox.depth()
        yield GaugeMetricFamily("sorterd_outbox_entries", "Records waiting in the outbox for the trainer's ack.",
                                value=float(entries))
        yield GaugeMetricFamily("sorterd_outbox_bytes", "Payload bytes waiting in the outbox.", value=float(size))
        dropped = CounterMetricFamily("sorterd_link_dropped", "Records for the trainer not kept, by reason: "
                                      "queue_full, quota, refused (kept aside), duplicate, error, shutdown.",
                                      labels=["reason"])
        for reason, n in self.outbox.dropped_counts().items():
            dropped.add_metric([reason], float(n))
        yield dropped


class ValveCollector:
    """The valve backend's own figures (sorterd.controller.outputs.ValveStats), as Prometheus metrics.

    The backend keeps its counters on the event loop's thread; a scrape (HTTP
    thread) reads a snapshot of plain ints and floats -- no lock needed for
    figures that are only ever replaced or incremented.
    """

    def __init__(self, valves: Valves) -> None:
        self.valves = valves

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        st = self.valves.stats()
        if st is None:
            return
        h = st.fire_hist
        cumulative = [(str(le), float(n)) for le, n in zip(h.buckets, h.counts, strict=True)]
        yield HistogramMetricFamily(
            "sorterd_valve_fire_error_seconds", "|actual - intended| valve edge time, device-stamped.",
            buckets=[*cumulative, ("+Inf", float(h.count))], sum_value=h.sum_s)
        refusals = CounterMetricFamily("sorterd_valve_refusals", "Pulses the valve backend refused, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(st.refusals.items()):
            refusals.add_metric([reason], float(n))
        yield refusals
        yield CounterMetricFamily("sorterd_valve_watchdog_trips", "Times the controller switched every valve off "
                                  "because the host went silent.", value=float(st.watchdog_trips))
        yield CounterMetricFamily("sorterd_valve_reconnects", "Times the link to the controller came back.",
                                  value=float(st.reconnects))
        for name, doc, value, scale in (
            ("sorterd_valve_clock_offset_seconds", "Last clock-sync sample vs the fitted line.", st.clock_offset_ns, 1e-9),
            ("sorterd_valve_clock_rtt_seconds", "Round trip of the last clock-sync exchange.", st.clock_rtt_ns, 1e-9),
            ("sorterd_valve_clock_drift_ratio", "Controller clock rate vs nominal (a ratio: 1 ppm = 1e-6).",
             st.clock_drift_ppm, 1e-6),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value) * scale)


class InferenceCollector:
    """sorterd_inference_backend_info{backend="tensorrt:fp16"|"onnxruntime:CPUExecutionProvider"|...} 1."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("sorterd_inference_backend_info", "What runs the model now (1 for the active backend).",
                              labels=["backend", "version"])
        g.add_metric([self.model.backend, self.model.version], 1.0)
        yield g
