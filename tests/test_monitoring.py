"""The shipped monitoring files (monitoring/) agree with the daemon's metric names and with each other.

The real checks of the rules and of the dashboard's queries are in tests/test_prometheus.py (a
real Prometheus and promtool); these need neither: every series a rule or a panel names is one
sorterd exports (or one announced by a later issue), and the dashboard and its provisioning fit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from sorterd.controller.outputs import ValveStats
from sorterd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
MON = REPO / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "sorterd.json"
# Series the rules and the dashboard use before the daemon has them: the trainer link's
# (sorterd/link, being built) and the model rollbacks (a later issue).
ANNOUNCED = {"sorterd_outbox_entries", "sorterd_link_connected", "sorterd_model_rollbacks_total"}


def _exposition() -> str:
    """What a fully populated daemon registry serves (valve and recorder collectors too)."""
    st = ValveStats("mcu")
    st.fired(1_000_000, 1_000_020)
    st.refuse("controller disconnected")
    st.clock_offset_ns, st.clock_rtt_ns, st.clock_drift_ppm = 100.0, 150_000, 37.0
    m = Metrics()
    m.watch_valves(SimpleNamespace(stats=lambda: st))  # type: ignore[arg-type]
    m.watch_recorder(SimpleNamespace(errors=0, buffered=0, stalled=False, lost_counts=lambda: {"rows": 0}))
    for stage in ("segment", "infer", "decide", "compute", "model_only"):
        m.stage.labels(stage).observe(0.001)
    m.exposure_to_pulse.observe(0.01)
    m.trigger_to_exposure.observe(0.002)
    m.stones.labels("CUT").inc()
    m.pulses.labels("CUT", "fired").inc()
    m.overflow.labels("pairs").inc()
    m.queue_depth.labels("pairs").set(0)
    m.model.info({"version": "v002", "sha256": "ab"})
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    return body


def _exported_names() -> set[str]:
    body = _exposition()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in body.splitlines() if line and not line.startswith("#")}


def _named(text: str) -> set[str]:
    return set(re.findall(r"\bsorterd_[a-z0-9_]+\b", text))


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_series_the_rules_and_the_dashboard_name_is_exported_or_announced() -> None:
    exported = _exported_names()
    rules = _named((MON / "prometheus" / "sorterd.rules.yml").read_text())
    panels = _named(" ".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"]))
    for source, names in (("sorterd.rules.yml", rules), ("sorterd.json", panels)):
        unknown = names - exported - ANNOUNCED
        assert not unknown, f"{source} names series sorterd does not export: {sorted(unknown)}"
    # The alerts cover what issue 15 lists.
    alerts = {r["alert"] for g in yaml.safe_load((MON / "prometheus" / "sorterd.rules.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    assert alerts >= {"SorterdDown", "SorterdDeadlineMisses", "SorterdFlaggedRateHigh", "SorterdOutboxGrowing",
                      "SorterdLinkDown", "SorterdLightingFaults", "SorterdModelRolledBack"}


def test_counters_end_in_total_and_histograms_in_seconds() -> None:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", _exposition(), re.M))
    assert types and all(n.endswith("_total") for n, t in types.items() if t == "counter"), types
    assert all(n.endswith("_seconds") for n, t in types.items() if t == "histogram"), types
    for name in _exported_names():
        if name.endswith(("_bucket", "_count", "_sum")):
            assert name.rsplit("_", 1)[0].endswith("_seconds"), name
    assert not {n for n in _exported_names() if n.endswith("_ppm") or n.endswith("_ms")}


def test_the_dashboard_is_laid_out_and_uses_the_provisioned_datasource() -> None:
    dash = _dashboard()
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "sorterd.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    provider = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "sorterd.yml").read_text())
    assert [p["type"] for p in provider["providers"]] == ["file"] and provider["providers"][0]["options"]["path"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["datasource"]["uid"] in uids, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert all(t["datasource"]["uid"] in uids for t in p["targets"]), p["title"]
    kinds = {p["type"] for p in dash["panels"]}
    assert {"timeseries", "heatmap"} <= kinds
    heatmaps = [t["expr"] for p in dash["panels"] if p["type"] == "heatmap" for t in p["targets"]]
    assert heatmaps and all("_bucket" in e and "by (le)" in e for e in heatmaps)


def test_promtool_lints_the_full_exposition_valve_and_recorder_collectors_included() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("SORTERD_REQUIRE_PROMETHEUS"):
            pytest.fail("SORTERD_REQUIRE_PROMETHEUS is set, but promtool is not on PATH", pytrace=False)
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=_exposition(), capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
