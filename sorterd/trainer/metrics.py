"""The trainer's Prometheus metrics (prometheus-client), in a registry of their own.

    sorterd_trainer_received_total{sorter}             records stored (stones and sessions)
    sorterd_trainer_duplicates_total{sorter}           records already kept (a resend after a lost ACK)
    sorterd_trainer_refused_total{sorter,reason}       records refused for good, by reason category
    sorterd_trainer_unavailable_total                  stores that failed on the disk (retry later)
    sorterd_trainer_sorter_connected{sorter}           1 while the sorter was seen within connected_s
    sorterd_trainer_sorter_outbox_entries{sorter}      the sorter's outbox depth as it last reported

The two gauges are read from the inbox's per-sorter state at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from sorterd.metrics import close_server, serve_registry


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("sorterd_trainer_received_total", "Records stored in the dataset, by sorter.",
                                ["sorter"], registry=r)
        self.duplicates = Counter("sorterd_trainer_duplicates_total",
                                  "Records already kept (resent after a lost ACK): acknowledged, not written again.",
                                  ["sorter"], registry=r)
        self.refused = Counter("sorterd_trainer_refused_total", "Records refused for good, by sorter and reason.",
                               ["sorter", "reason"], registry=r)
        self.unavailable = Counter("sorterd_trainer_unavailable_total",
                                   "Stores that failed on the disk (full, read-only, unwritable): the sorter resends.",
                                   registry=r)
        self.server: Any = None

    def watch(self, sorters: Callable[[], dict[str, tuple[bool, int]]]) -> None:
        """Expose each sorter's (connected, outbox entries), read from `sorters()` at scrape time."""
        self.registry.register(_SorterCollector(sorters))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        self.server, bound = serve_registry(self.registry, host, port)
        return bound

    def close(self) -> None:
        close_server(self.server)


class _SorterCollector:
    def __init__(self, sorters: Callable[[], dict[str, tuple[bool, int]]]) -> None:
        self._sorters = sorters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        connected = GaugeMetricFamily("sorterd_trainer_sorter_connected",
                                      "1 while the sorter was seen (heartbeat or record) recently.", labels=["sorter"])
        entries = GaugeMetricFamily("sorterd_trainer_sorter_outbox_entries",
                                    "The sorter's outbox depth (entries waiting) as it last reported.",
                                    labels=["sorter"])
        for sorter, (is_connected, outbox_entries) in sorted(self._sorters().items()):
            connected.add_metric([sorter], 1.0 if is_connected else 0.0)
            entries.add_metric([sorter], float(outbox_entries))
        yield connected
        yield entries
