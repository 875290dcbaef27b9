"""A bench that answers questions (issue 15 item 4): feed rate and frame size swept on the wall clock.

    python bench/sweep.py                                   # the full sweep (~10 min on the 2-core VM)
    python bench/sweep.py --rates 20,60,120 --sizes sim,roi800,full --stones 400 --size-rate 20
    python bench/sweep.py --edge                            # "small edge device": pinned to one core
    python bench/sweep.py --smoke --out-dir /tmp/s          # a few stones, one rate, one size (tests)

Two sweeps, each run being `sorterd run --sim` in this process (`sorterd.cli.run.run`):

* **rate**: the simulator's frames (640x240 at 20 px/mm) on a fast channel (`FAST_CHANNEL`:
  800 mm/s, 1 mm singulation gap, so up to ~170 stones/s can really be fed) at each of
  `--rates`; the summary's `feed` section gives the rate achieved.
* **size**: at `--size-rate` stones/s, each frame profile of `PROFILES`: the simulator's frames,
  an 800x800 ROI at 70 px/mm, a full 2448x2048 frame at 70 px/mm.

Per run: the summary (JSON), every stage's per-stone latencies (the pipeline's own samples:
`compute` = segment + infer + decide measured inside the worker, `model_only` = the bare
session.run in the same run), RSS over wall time (bench/memory.py's sampler), start -> READY.
Plots (PNG) in --out-dir: latency CDFs per stage, compute vs bare model per frame size, deadline
misses and unseen stones vs rate, RSS over time; and `sweep.json` with every figure.

Rendering the simulated frames is the simulator's work, not the sorter's: it runs in the same
worker pool (a sensor readout stands in for it) but is not inside any stage's timer; it does
compete for the cores, so the wall-clock figures are pessimistic, most at 2448x2048
(`render_ms` in sweep.json: the render cost per frame, measured apart).

`--edge` pins this whole process (sorter and simulator) to one core with
os.sched_setaffinity, a stand-in for a Pi-class budget.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import Sampler, decided_by, track_pipelines  # noqa: E402 -- bench/memory.py, reused

STAGES = ("segment", "infer", "decide", "compute", "model_only", "exposure_to_pulse")
# 800 mm/s and a 1 mm gap: ~170 stones/s can be fed; a 5 ms pair interval keeps the pair's 4 mm
# move well inside the 32 mm view even when an exposure comes a few ms late.
FAST_CHANNEL: dict[str, dict[str, Any]] = {"sim": {"speed_mm_s": 800.0, "min_gap_mm": 1.0},
                                           "geometry": {"speed_max_mm_s": 1500.0},
                                           "lights": {"pair_interval_ms": 5.0, "lights_off_ms": 10.0}}
# name -> (config overrides, label)
PROFILES: dict[str, tuple[dict[str, dict[str, Any]], str]] = {
    "sim": ({}, "640x240 @ 20 px/mm"),
    # An 11.4 mm view: a whole stone (up to ~8 mm long) must be in view when its front breaks
    # the beam, and still in view 2 ms later (0.8 mm at 400 mm/s) plus the trigger's latency.
    "roi800": ({"camera": {"width_px": 800, "height_px": 800, "pixels_per_mm": 70.0},
                "trigger": {"beam_x_mm": 8.5}, "lights": {"pair_interval_ms": 2.0, "lights_off_ms": 4.0}},
               "800x800 ROI @ 70 px/mm"),
    "full": ({"camera": {"width_px": 2448, "height_px": 2048, "pixels_per_mm": 70.0}}, "2448x2048 @ 70 px/mm"),
}


def merge(*parts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in parts:
        for section, values in p.items():
            out.setdefault(section, {}).update(values)
    return out


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


class ReadyClock:
    """Start -> calibrated -> READY, from the run's own calls (calibrate.for_run, sdnotify)."""

    def __init__(self) -> None:
        from sorterd import sdnotify
        from sorterd.calibration import checklist as calibrate

        self.reset()
        for_run, notify = calibrate.for_run, sdnotify.notify

        def timed_for_run(*args: Any, **kwargs: Any) -> Any:
            got = for_run(*args, **kwargs)
            self.calibrated = time.monotonic()
            return got

        def timed_notify(state: str) -> bool:
            if state.startswith("READY=1") and self.ready is None:
                self.ready = time.monotonic()
            return notify(state)

        calibrate.for_run = timed_for_run  # type: ignore[assignment]
        sdnotify.notify = timed_notify  # type: ignore[assignment]

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.calibrated: float | None = None
        self.ready: float | None = None

    def figures(self) -> dict[str, float | None]:
        def s(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 3)
        return {"start_to_ready_s": s(self.t0, self.ready), "calibrated_to_ready_s": s(self.calibrated, self.ready)}


def render_ms(profile: str, frames: int = 10) -> float:
    """The simulator's cost to render one frame of this profile (median), apart from any run."""
    from sorterd import config
    from sorterd.cli.compose import load_config
    from sorterd.sim.machine import SimMachine

    m = SimMachine(load_config(config.sim_config_path(), PROFILES[profile][0]))
    m.world.feed(20, 0)
    t = m.world.stones[3].t_at_x_ns(m.world.view_mm[0] / 2)
    took = []
    for i in range(frames):
        a = time.perf_counter()
        m.render("toplit", t + i)
        took.append(time.perf_counter() - a)
    return round(float(np.median(took)) * 1e3, 3)


def one_run(profile: str, rate: float, stones: int, clock: str, fast: bool, tmp: Path,
            made: list[Any], ready: ReadyClock) -> dict[str, Any]:
    from sorterd import config
    from sorterd.cli.compose import load_config
    from sorterd.cli.run import RunOptions, run

    overrides = merge(PROFILES[profile][0], FAST_CHANNEL if fast else {},
                      {"sim": {"rate_per_s": rate, "clock": clock}, "record": {"log_dir": str(tmp)},
                       "metrics": {"enabled": False}})
    cfg = load_config(config.sim_config_path(), overrides)
    ready.reset()
    sampler = Sampler(decided_by(made), 0.5)
    sampler.start()
    load_before = load_avg()
    summary = run(cfg, RunOptions(stones=stones, progress=False), out=io.StringIO()).summary
    sampler.stop.set()
    sampler.sample()
    pipeline = made[-1]
    from sorterd.sim import render  # the simulator's caches share the process: their size, to tell apart

    sim_mb = sum(a.nbytes for a in [*render._BACKGROUNDS.values(), *render._NOISE_BANKS.values()]) / 2**20
    sim_mb += sum(v.nbytes for looks in render._LOOKS.values() for look in looks.values()
                  for v in vars(look).values() if isinstance(v, np.ndarray)) / 2**20
    lat = {k: [round(v * 1e3, 4) for v in pipeline.stats.latency_s[k]] for k in STAGES}
    p50 = summary["latency_ms"]
    ratio = (p50["compute"]["p50"] / p50["model_only"]["p50"]) if p50["model_only"]["p50"] else None
    return {"profile": profile, "rate": rate, "stones": stones, "clock": clock, "fast_channel": fast,
            "load_before": load_before, "load_after": load_avg(), "feed": summary.get("feed"),
            "stones_fed": summary.get("stones_fed"), "unseen_stones": summary.get("unseen_stones"),
            "deadline_misses": summary["deadline_misses"], "landed_as_decided_rate": summary.get("landed_as_decided_rate"),
            "latency_ms": summary["latency_ms"], "compute_over_model_p50": None if ratio is None else round(ratio, 3),
            "rss_kb": sampler.rows, "rss_max_mb": round(max(r[2] for r in sampler.rows) / 1024, 1),
            "sim_caches_mb": round(sim_mb, 1),
            **ready.figures(), "wall_s": summary["wall_s"], "samples_ms": lat}


def plots(runs: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict[str, Any]) -> str:
        return f"{r['profile']} @ {r['rate']:g}/s"

    written = []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, stage in zip(axes.ravel(), STAGES, strict=True):
        for r in runs:
            v = np.sort(np.array(r["samples_ms"][stage]))
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label(r))
        ax.set_xscale("log")
        ax.set_title(stage)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of stones")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"latency CDF per stage ({title})")
    fig.tight_layout()
    written.append(out_dir / "latency_cdf.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    by_size = [r for r in runs if r["sweep"] == "size"] or runs
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(by_size))
    for k, (stage, q, off) in enumerate([("compute", "p50", -0.3), ("model_only", "p50", -0.1),
                                         ("compute", "p99", 0.1), ("model_only", "p99", 0.3)]):
        ax.bar(x + off, [r["latency_ms"][stage][q] or 0 for r in by_size], 0.2, label=f"{stage} {q}",
               color=f"C{k % 2}", alpha=1.0 if q == "p50" else 0.5)
    ax.set_xticks(x, [f"{PROFILES[r['profile']][1]}\ncompute/model p50 {r['compute_over_model_p50']}" for r in by_size],
                  fontsize=8)
    ax.set_ylabel("ms per stone")
    ax.set_title(f"compute (segment+infer+decide) vs bare model, per frame size ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "compute_vs_model.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    by_rate = sorted((r for r in runs if r["sweep"] == "rate"), key=lambda r: r["rate"]) or runs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fed = [(r["feed"] or {}).get("achieved_per_s") or r["rate"] for r in by_rate]
    ax.plot(fed, [r["deadline_misses"] for r in by_rate], "o-", label="deadline misses")
    ax.plot(fed, [r["unseen_stones"] or 0 for r in by_rate], "s-", label="unseen stones")
    ax.set_xlabel("achieved feed rate, stones/s (sim frames, fast channel)")
    ax.set_ylabel(f"stones (of {by_rate[0]['stones']})")
    ax.set_title(f"deadline misses and unseen stones vs rate ({title})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "misses_vs_rate.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        rows = np.array(r["rss_kb"], dtype=float)
        ax.plot(rows[:, 0], rows[:, 2] / 1024, label=label(r))
    ax.axhline(250, color="red", ls="--", lw=1, label="target 250 MB")
    ax.set_xlabel("wall s (each run from its start)")
    ax.set_ylabel("RSS MB (sorter + simulator, one process)")
    ax.set_title(f"RSS over time ({title})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "rss.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written


def run_one(args: argparse.Namespace) -> int:
    """One run, in this process (the sweep's child): its figures to OUT_DIR/run.json."""
    if args.full_mask:
        from sorterd.sorting import segment

        segment.mask_step = lambda pixels_per_mm: 1  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="sorterd-run-") as tmp:
        r = one_run(args.one, float(args.rates.split(",")[0]), args.stones, args.clock, args.fast, Path(tmp),
                    track_pipelines(), ReadyClock())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "run.json").write_text(json.dumps(r) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="20,50,100,140", help="comma-separated stones/s for the rate sweep")
    ap.add_argument("--sizes", default="sim,roi800,full", help=f"frame profiles: {', '.join(PROFILES)}")
    ap.add_argument("--size-rate", type=float, default=20.0, help="stones/s of the frame-size sweep")
    ap.add_argument("--stones", type=int, default=400)
    ap.add_argument("--clock", choices=("wall", "virtual"), default="wall")
    ap.add_argument("--edge", action="store_true", help="pin the process to one core (a Pi-class budget)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/sweep"))
    ap.add_argument("--full-mask", action="store_true",
                    help="segment with the whole frame masked at full resolution (the code before the coarse "
                         "mask: a before/after in one tree)")
    ap.add_argument("--one", choices=tuple(PROFILES), help=argparse.SUPPRESS)  # one run (the sweep's child)
    ap.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # that run on FAST_CHANNEL
    ap.add_argument("--smoke", action="store_true", help="a few stones, one rate, one size (the test's mode)")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in PROFILES]
    if bad or not rates or any(r <= 0 for r in rates):
        ap.error(f"--sizes: unknown {', '.join(bad)} (known: {', '.join(PROFILES)}); --rates: positive numbers")
    if args.smoke:
        rates, sizes, args.stones = rates[:1], [], 8
    if args.one:
        return run_one(args)
    if args.edge:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # inherited by every run's process
    plan = [("rate", "sim", r) for r in rates] + [("size", s, args.size_rate) for s in sizes]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{'edge: 1 core' if args.edge else f'{len(os.sched_getaffinity(0))} cores'}, {args.clock} clock"
             + (", full-frame mask" if args.full_mask else ""))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sorterd-sweep-") as tmp:
        for i, (sweep, profile, rate) in enumerate(plan):
            # Each run in a process of its own: its RSS is that run's, from a cold start.
            work = Path(tmp) / str(i)
            work.mkdir()
            cmd = [sys.executable, __file__, "--one", profile, "--rates", str(rate), "--stones", str(args.stones),
                   "--clock", args.clock, "--out-dir", str(work)] + (["--fast"] if sweep == "rate" else []) \
                + (["--full-mask"] if args.full_mask else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"sweep: the run {profile} at {rate:g}/s failed (exit {done.returncode}): {shlex.join(cmd)}")
            r = json.loads((work / "run.json").read_text())
            r["sweep"] = sweep
            runs.append(r)
            lat = r["latency_ms"]
            print(f"{sweep:4} {profile:6} {rate:6g}/s fed {r['feed'] and r['feed']['achieved_per_s']}/s  "
                  f"compute p50/p99 {lat['compute']['p50']}/{lat['compute']['p99']} ms  model_only p50 "
                  f"{lat['model_only']['p50']}  ratio {r['compute_over_model_p50']}  misses {r['deadline_misses']}  "
                  f"unseen {r['unseen_stones']}  RSS max {r['rss_max_mb']} MB (sim caches {r['sim_caches_mb']})  READY {r['calibrated_to_ready_s']} s "
                  f"after calibration  load {r['load_before']}->{r['load_after']}", file=sys.stderr, flush=True)
    pngs = plots(runs, args.out_dir, title)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}", "cores": title,
              "render_ms": {p: render_ms(p) for p in dict.fromkeys(["sim", *sizes])},
              "runs": [{k: v for k, v in r.items() if k != "samples_ms"} for r in runs]}
    (args.out_dir / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print("wrote " + ", ".join(str(p) for p in [*pngs, args.out_dir / "sweep.json"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
