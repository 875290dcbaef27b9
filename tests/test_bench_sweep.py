"""bench/sweep.py in its smoke mode (a few stones, one rate, one size), so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sweep_smoke_writes_its_plots_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--rates", "30",
                        "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("latency_cdf.png", "compute_vs_model.png", "misses_vs_rate.png", "rss.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    result = json.loads((out / "sweep.json").read_text())
    (run,) = result["runs"]
    assert run["profile"] == "sim" and run["rate"] == 30 and run["stones"] == 8
    assert run["stones_fed"] == 8 and run["feed"]["requested_per_s"] == 30
    assert run["latency_ms"]["compute"]["p50"] > run["latency_ms"]["model_only"]["p50"] > 0
    assert 0 < run["calibrated_to_ready_s"] < run["start_to_ready_s"]
    assert run["rss_max_mb"] > 50 and len(run["rss_kb"]) >= 1
    assert result["render_ms"]["sim"] > 0


def test_sweep_refuses_an_unknown_frame_profile(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--sizes", "huge", "--out-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--sizes: unknown huge (known: sim, roi800, full)" in r.stderr
