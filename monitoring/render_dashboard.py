"""Draw the Grafana dashboard's panels from a real Prometheus, with matplotlib, into one PNG.

Grafana is not packaged for this Debian (nor on PyPI), so the README's dashboard picture is made
this way: every panel of monitoring/grafana/dashboards/sorterd.json is laid out on its gridPos,
its PromQL queries (the dashboard's own `expr`s, `$instance` = all, `$__rate_interval` = the
--rate-interval given) are run against Prometheus's HTTP API (query_range; instant queries for
tables), and drawn: time series as lines, heatmaps as de-accumulated bucket counts over time on
a log latency axis, tables as text.  It shows the same queries Grafana would run, not Grafana.

    python monitoring/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 5 \
        --out docs/dashboard.png

Needs matplotlib (the `train` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "dashboards" / "sorterd.json"


def substitute(expr: str, rate_interval: str) -> str:
    """The dashboard's variables as Grafana would fill them for 'All' sorters."""
    return expr.replace("$__rate_interval", rate_interval).replace('"$instance"', '".*"')


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out if "{{" not in out else ",".join(f"{k}={v}" for k, v in labels.items())


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{params.get('query')}: {body}")
        return list(body["data"]["result"])

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:g}"})

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})


def _series_xy(result: dict[str, Any], t0: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for t, v in result["values"]:
        value = float(v)
        if math.isfinite(value):
            xs.append(float(t) - t0)
            ys.append(value)
    return xs, ys


def _draw_timeseries(ax: Any, panel: dict[str, Any], prom: Prometheus, span: tuple[float, float, float],
                     rate_interval: str) -> None:
    start, end, step = span
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    scale, label = {"s": (1e3, "ms"), "percentunit": (100.0, "%"), "ops": (1.0, "/s")}.get(unit, (1.0, ""))
    drawn = 0
    for target in panel["targets"]:
        for r in prom.range(substitute(target["expr"], rate_interval), start, end, step):
            xs, ys = _series_xy(r, start)
            if xs:
                ax.plot(xs, [y * scale for y in ys], lw=1.2, label=legend(target.get("legendFormat", ""), r["metric"]))
                drawn += 1
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_ylabel(label, fontsize=7)
    ax.set_xlabel("s", fontsize=7)


def _draw_heatmap(ax: Any, panel: dict[str, Any], prom: Prometheus, span: tuple[float, float, float],
                  rate_interval: str) -> None:
    import numpy as np

    start, end, step = span
    results = prom.range(substitute(panel["targets"][0]["expr"], rate_interval), start, end, step)
    rows = sorted(((float(r["metric"]["le"]), r) for r in results if r["metric"].get("le") not in (None, "+Inf")),
                  key=lambda x: x[0])
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    times = sorted({float(t) for _, r in rows for t, _ in r["values"]})
    col = {t: i for i, t in enumerate(times)}
    cum = np.zeros((len(rows), len(times)))
    for i, (_, r) in enumerate(rows):
        for t, v in r["values"]:
            cum[i, col[float(t)]] = float(v) if math.isfinite(float(v)) else 0.0
    counts = np.diff(np.vstack([np.zeros((1, len(times))), cum]), axis=0).clip(min=0)  # per bucket, like Grafana
    bounds = [le for le, _ in rows]
    edges_ms = np.array([bounds[0] / 2, *bounds]) * 1e3
    x = np.array([*(t - start for t in times), times[-1] - start + step])
    mesh = ax.pcolormesh(x, edges_ms, np.ma.masked_where(counts <= 0, counts), cmap="Oranges", shading="flat")
    filled = np.nonzero(counts.sum(axis=1) > 0)[0]
    ax.set_yscale("log")
    if filled.size:
        ax.set_ylim(edges_ms[max(filled[0] - 1, 0)], edges_ms[min(filled[-1] + 2, len(edges_ms) - 1)])
    ax.set_ylabel("ms (bucket upper bounds)", fontsize=7)
    ax.set_xlabel("s", fontsize=7)
    ax.figure.colorbar(mesh, ax=ax, pad=0.01).ax.tick_params(labelsize=6)


def _draw_table(ax: Any, panel: dict[str, Any], prom: Prometheus, span: tuple[float, float, float],
                rate_interval: str) -> None:
    """Each query's last value within the span (a sorter that ended its batch is no longer scraped)."""
    start, end, step = span
    ax.axis("off")
    lines = []
    for target in panel["targets"]:
        expr = f"last_over_time(({substitute(target['expr'], rate_interval)})[{end - start:.0f}s:{step:g}s])"
        result = prom.instant(expr, end)
        name = target.get("legendFormat", "")
        if not result:
            lines.append(f"{name}: no data")
        for r in result:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(r["metric"].items()))
            lines.append(f"{legend(name, r['metric'])}: {float(r['value'][1]):g}   ({labels})")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7, wrap=True,
            transform=ax.transAxes)


def render(dashboard: dict[str, Any], prom: Prometheus, start: float, end: float, step: float,
           rate_interval: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, height * 0.45))
    grid = fig.add_gridspec(height, 24, hspace=0.0, wspace=2.0, top=0.95, bottom=0.02)
    for p in panels:
        g = p["gridPos"]
        # The panel's last 2 grid rows and last column stay empty: its axis labels and the next title.
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"] - 2, g["x"]:g["x"] + g["w"] - 1])
        ax.set_title(p["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=6)
        if p["type"] == "heatmap":
            _draw_heatmap(ax, p, prom, (start, end, step), rate_interval)
        elif p["type"] == "table":
            _draw_table(ax, p, prom, (start, end, step), rate_interval)
        else:
            _draw_timeseries(ax, p, prom, (start, end, step), rate_interval)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end))
    fig.suptitle(f"{dashboard['title']}  --  rendered by monitoring/render_dashboard.py from Prometheus "
                 f"({prom.url}), {end - start:.0f} s to {stamp}; not a Grafana screenshot", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD, help="Grafana dashboard JSON")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "dashboard.png")
    ap.add_argument("--minutes", type=float, default=5.0, help="time span ending at --end (default 5)")
    ap.add_argument("--end", type=float, help="end of the span, unix seconds (default: now)")
    ap.add_argument("--step", type=float, default=2.0, help="query_range step, seconds")
    ap.add_argument("--rate-interval", default="10s", help="what $__rate_interval becomes (>= 4 scrape intervals)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.step <= 0:
        print("render_dashboard: --minutes and --step must be > 0", file=sys.stderr)
        return 2
    end = args.end if args.end is not None else time.time()
    try:
        dashboard = json.loads(args.dashboard.read_text())
    except (OSError, ValueError) as exc:
        print(f"render_dashboard: cannot read the dashboard {args.dashboard}: {exc}", file=sys.stderr)
        return 2
    try:
        render(dashboard, Prometheus(args.prometheus), end - args.minutes * 60, end, args.step, args.rate_interval,
               args.out)
    except (OSError, RuntimeError) as exc:
        print(f"render_dashboard: querying {args.prometheus}: {exc}", file=sys.stderr)
        return 1
    print(f"render_dashboard: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
