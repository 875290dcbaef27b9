"""Metrics are served on loopback with Prometheus names."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sorterd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_a_lingering_batch_serves_its_final_counts_and_a_signal_ends_the_wait(tmp_path: Path) -> None:
    """--metrics-linger: after the batch, /metrics still answers with the summary's counts; SIGTERM
    then ends the wait at once, and the complete batch still ends as completed (exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "sorterd", "run", "--sim", "--clock", "wall", "--stones", "20",
                             "--rate", "20", "--metrics-port", str(port), "--metrics-linger", "120", "--no-progress",
                             "--json", str(out), "--log-dir", str(tmp_path / "logs")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        final: dict[str, float] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                body = ""
            final = {m[1]: float(m[2]) for m in re.finditer(r'^sorterd_stones_total\{bin="(\w+)"\} (\S+)$', body, re.M)}
            if sum(final.values()) >= 20:  # every fed stone decided: the batch is over, the server still up
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended instead of lingering"
        assert sum(final.values()) == 20, final
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        rc = proc.wait(timeout=30)
        assert time.monotonic() - t_sig < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    summary = json.loads(out.read_text())
    batch = json.loads(next((tmp_path / "logs").glob("batch_*/batch.json")).read_text())
    assert batch["stop_reason"] == "completed" and summary["stop"]["reason"] == "completed"
    assert {b: float(n) for b, n in summary["decided"].items() if n} == final
    assert summary["wall_s"] < 60  # the linger is not part of the run's time
