"""Metrics are served on loopback with Prometheus names."""

from __future__ import annotations

import urllib.request

from sorterd.metrics import Metrics


def test_metrics_served_on_localhost() -> None:
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        m.stones.labels("CUT").inc(3)
        m.deadline_misses.inc()
        m.stage.labels("infer").observe(0.002)
        m.queue_depth.labels("pairs").set(2)
        m.model.info({"version": "v009", "sha256": "ab"})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    assert 'sorterd_stones_total{bin="CUT"} 3.0' in body
    assert "sorterd_deadline_misses_total 1.0" in body
    assert 'sorterd_stage_seconds_bucket{le="0.002",stage="infer"} 1.0' in body
    assert 'sorterd_queue_depth{queue="pairs"} 2.0' in body
    assert 'sorterd_model_info{sha256="ab",version="v009"} 1.0' in body
