"""A real Prometheus (Debian's `prometheus` package) scrapes a running simulated sorter.

Also: `promtool check metrics` on the exposition, `promtool check rules` / `test rules` on the
shipped rules (monitoring/prometheus/), `promtool check config` on the example scrape config.
Without prometheus/promtool on PATH these tests skip -- or fail where SORTERD_REQUIRE_PROMETHEUS
is set (.ci/run installs the package and sets it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sorterd.metrics import STAGE_BUCKETS_S, Metrics

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "monitoring" / "prometheus"
REQUIRE = "SORTERD_REQUIRE_PROMETHEUS"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not on PATH (Debian: apt-get install prometheus)"
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set, but {why}", pytrace=False)
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_passes_the_shipped_rules_their_unit_tests_and_the_example_config() -> None:
    for args in (("check", "rules", str(RULES / "sorterd.rules.yml")),
                 ("test", "rules", str(RULES / "sorterd.rules.test.yml")),
                 ("check", "config", str(RULES / "prometheus.yml"))):
        r = _promtool(*args)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_promtool_lints_the_exposition_clean_and_buckets_resolve_sub_millisecond_stages() -> None:
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        for stage, v in (("segment", 0.0006), ("infer", 0.003), ("decide", 0.00012)):
            m.stage.labels(stage).observe(v)
        m.stones.labels("CUT").inc()
        m.queue_depth.labels("pairs").set(1)
        m.model.info({"version": "v002", "sha256": "ab"})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    r = _promtool("check", "metrics", stdin=body)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    assert "_created" not in body  # no per-series creation gauges cluttering every query
    below_ms = [b for b in STAGE_BUCKETS_S if b < 1e-3]
    assert len(below_ms) >= 8 and min(STAGE_BUCKETS_S) <= 1e-5  # decide (~0.1 ms) spans buckets


# -- the real scrape ------------------------------------------------------------------


class Prom:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=5) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prom, int]]:
    """A real Prometheus on loopback, scraping 127.0.0.1:<target port> every second; (api, target port)."""
    binary = _tool("prometheus")
    target, port = _free_port(), _free_port()
    shutil.copy(RULES / "sorterd.rules.yml", tmp_path / "sorterd.rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "rule_files: [sorterd.rules.yml]\n"
        "scrape_configs:\n"
        f"  - job_name: sorterd\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n")
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = Prom(port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{api.url}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready in 60 s"
            time.sleep(0.2)
        yield api, target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_for(what: str, probe: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"prometheus never showed {what} within {timeout_s:.0f} s"
        time.sleep(0.5)


def _bucket_of(v_s: float) -> tuple[float, float]:
    """The stage histogram's bucket (lower, upper] holding v_s."""
    lower = 0.0
    for b in STAGE_BUCKETS_S:
        if v_s <= b:
            return lower, b
        lower = b
    return lower, math.inf


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_simulated_sorter_and_agrees_with_its_summary(
        prometheus: tuple[Prom, int], tmp_path: Path) -> None:
    api, target = prometheus
    out = tmp_path / "summary.json"
    # This checkout's sorterd, whatever the venv has installed (the run's cwd is elsewhere).
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # The last scrape must come after the batch ends: lingering 4 s at a 1 s scrape interval.
    sorter = subprocess.Popen(
        [sys.executable, "-m", "sorterd", "run", "--sim", "--clock", "wall", "--stones", "120", "--rate", "20",
         "--metrics-port", str(target), "--metrics-linger", "4", "--no-progress", "--json", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def sorter_up() -> bool:
            assert sorter.poll() is None or out.exists(), "the sorter ended early:\n" + str(sorter.stdout and sorter.stdout.read())
            return api.by('up{job="sorterd"}', "job").get("sorterd") == 1.0

        _wait_for("the sorter up", sorter_up, 120)  # calibration first; slow on a loaded machine
        exposition = _wait_for("a scrapable /metrics", lambda: _fetch(f"http://127.0.0.1:{target}/metrics"), 30)
        stdout, _ = sorter.communicate(timeout=180)
        ended = time.time()
    finally:
        if sorter.poll() is None:
            sorter.kill()
            sorter.wait()
    assert sorter.returncode == 0, stdout[-3000:]
    summary = json.loads(out.read_text())

    lint = _promtool("check", "metrics", stdin=exposition)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # After the run the target is gone; the last scraped value of each series is what counts.
    def last(expr: str, label: str) -> dict[str, float]:
        return api.by(f"last_over_time({expr}[10m])", label)

    decided = {b: float(n) for b, n in summary["decided"].items() if n}
    assert last("sorterd_stones_total", "bin") == decided  # exact: the sorter lingered past a scrape
    assert sum(decided.values()) == summary["objects_decided"]
    assert last("sorterd_captures_total", "job") == {"sorterd": float(summary["captures"])}
    assert last("sorterd_flagged_total", "job") == {"sorterd": float(summary["flagged"])}
    assert last("sorterd_deadline_misses_total", "job") == {"sorterd": float(summary["deadline_misses"])}

    fired = last('sorterd_pulses_total{status="fired"}', "valve")
    for valve in ("CUT", "SELECT", "FLIP"):  # every stone sent to a bin had its jet fire (ideal valves)
        assert fired.get(valve, 0.0) == float(summary["routed"][valve]) - _risks_into(summary, valve), valve

    counts = last("sorterd_stage_seconds_count", "stage")
    assert set(counts) == {"segment", "infer", "decide", "compute", "model_only"}
    assert len(set(counts.values())) == 1 and 0 < counts["compute"] <= summary["objects_decided"]
    assert last("sorterd_exposure_to_pulse_seconds_count", "job")["sorterd"] > 0
    # The histogram's median lies in the bucket of the summary's exact median (or a neighbour: the
    # summary's p50 is of the same samples, the histogram interpolates inside one bucket).
    for stage in ("segment", "infer", "decide"):
        p50_s = summary["latency_ms"][stage]["p50"] / 1e3
        est = api.query(f'histogram_quantile(0.5, last_over_time(sorterd_stage_seconds_bucket{{stage="{stage}"}}[10m]))')
        value = float(est[0]["value"][1])
        lo, hi = _bucket_of(p50_s)
        width = hi - lo
        assert lo - width <= value <= hi + width, (stage, p50_s, value)

    queues = last("sorterd_queue_depth", "queue")
    assert set(queues) >= {"pairs", "record"} and all(v >= 0 for v in queues.values())
    model = api.query("last_over_time(sorterd_model_info[10m])")
    assert [r["metric"]["version"] for r in model] == [summary["model"]["version"]]
    # Every dashboard query is valid PromQL here, and the core panels have data at the run's end.
    dashboard = json.loads((REPO / "monitoring" / "grafana" / "dashboards" / "sorterd.json").read_text())
    at = f"{ended - 1.0:.3f}"
    with_data = set()
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "10s").replace('"$instance"', '".*"')
            body = api.get("/api/v1/query", query=expr, time=at)
            assert body["status"] == "success", (panel["title"], expr, body)
            if body["data"]["result"]:
                with_data.add(panel["title"])
    for title in ("Stones per second, by decided bin", "Latency heatmap: infer", "Stage latency p50 / p99",
                  "Queue depths", "Model release and link", "Pulses fired / refused per second, by valve"):
        assert title in with_data, title
    # The shipped rules load and evaluate against the real series.
    groups = api.get("/api/v1/rules")["data"]["groups"]
    health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert "SorterdDown" in health and "sorterd:stones:rate1m" in health
    assert set(health.values()) <= {"ok", "unknown"}, health

    # The README's picture is drawn this way: the dashboard's panels from this Prometheus.
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("render_dashboard", REPO / "monitoring" / "render_dashboard.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    png = tmp_path / "dashboard.png"
    assert render.main(["--prometheus", api.url, "--end", f"{ended:.0f}", "--minutes", "1", "--step", "1",
                        "--rate-interval", "5s", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


def _risks_into(summary: dict[str, Any], valve: str) -> float:
    """Stones routed to `valve` only as a co-deflection risk (no jet of their own)."""
    risks = summary.get("co_deflection_risks", 0)
    if isinstance(risks, dict):
        return float(sum(1 for into in risks.values() if into == valve))
    return 0.0 if not risks else math.nan


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None
