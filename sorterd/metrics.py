"""Prometheus metrics (prometheus-client), one registry per daemon.

Names follow Prometheus conventions: `sorterd_stones_total{bin=...}`,
`sorterd_stage_seconds{stage=...}` histograms, gauges for queue depths.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# Stage latencies are milliseconds-scale; buckets from 0.1 ms to 0.5 s.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stones = Counter("sorterd_stones_total", "Objects decided, by decided bin.", ["bin"], registry=r)
        self.flagged = Counter("sorterd_flagged_total", "Stones flagged for review.", registry=r)
        self.clusters = Counter("sorterd_clusters_total", "Touching stones seen as one object (safe route).", registry=r)
        self.deadline_misses = Counter("sorterd_deadline_misses_total", "Pulses not sent because they would be late.", registry=r)
        self.conflicts = Counter("sorterd_neighbour_conflicts_total", "Stones sent the safe route because a jet would also catch a neighbour.", registry=r)
        self.overflow = Counter("sorterd_queue_overflow_total", "Items that found a full queue, by queue.", ["queue"], registry=r)
        self.camera_failures = Counter("sorterd_camera_failures_total", "Times the camera was lost.", registry=r)
        self.camera_gap_triggers = Counter("sorterd_camera_gap_triggers_total", "Triggers lost while the camera was away (stones fell to REJECT).", registry=r)
        self.captures = Counter("sorterd_captures_total", "Frame pairs captured.", registry=r)
        self.pulses = Counter("sorterd_pulses_total", "Valve pulses by outcome.", ["valve", "status"], registry=r)
        self.stage = Histogram("sorterd_stage_seconds", "Per-stage latency.", ["stage"], buckets=_BUCKETS, registry=r)
        self.queue_depth = Gauge("sorterd_queue_depth", "Items waiting, by queue.", ["queue"], registry=r)
        self.model = Info("sorterd_model", "The active model bundle.", registry=r)
        self.server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        result = start_http_server(port, addr=host, registry=self.registry)
        self.server = result[0] if isinstance(result, tuple) else None
        return int(self.server.server_port) if self.server is not None else port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
