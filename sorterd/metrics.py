"""Prometheus metrics (prometheus-client), one registry per daemon.

Names follow Prometheus conventions: `sorterd_stones_total{bin=...}`,
`sorterd_stage_seconds{stage=...}` histograms, gauges for queue depths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sorterd.parts.valves import Valves

# Stage latencies are milliseconds-scale; buckets from 0.1 ms to 0.5 s.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


class Metrics:
    def __init__(self) -> None:
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
        self.stage = Histogram("sorterd_stage_seconds", "Per-stage latency.", ["stage"], buckets=_BUCKETS, registry=r)
        self.queue_depth = Gauge("sorterd_queue_depth", "Items waiting, by queue.", ["queue"], registry=r)
        self.model = Info("sorterd_model", "The active model bundle.", registry=r)
        self.ood_stones = Counter("sorterd_ood_stones_total", "Stones over the model's out-of-distribution limit (sent to SELECT, flagged).", registry=r)
        self.ood_share = Gauge("sorterd_ood_batch_share", "Share of the last scored stones over the out-of-distribution limit.", registry=r)
        self.ood_alarm = Gauge("sorterd_ood_alarm", "1 while the batch has drifted outside what the model knows (collect and label stones).", registry=r)
        self.server: Any = None

    def watch_valves(self, valves: Valves) -> None:
        """Expose a valve backend's timing and faults, read at scrape time (none for backends without)."""
        self.registry.register(ValveCollector(valves))

    def watch_recorder(self, recorder: RecordFigures) -> None:
        """Expose what the production log lost and whether its writer is stalled, read at scrape time."""
        self.registry.register(RecordCollector(recorder))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        result = start_http_server(port, addr=host, registry=self.registry)
        self.server = result[0] if isinstance(result, tuple) else None
        return int(self.server.server_port) if self.server is not None else port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


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
            ("sorterd_valve_clock_drift_ppm", "Controller clock rate vs nominal.", st.clock_drift_ppm, 1.0),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value) * scale)
