"""The link's soak (issue 10, §5.1): the simulated sorter on the wall clock at 2x its nominal
rate with ~20 % flagged, the trainer offline for most of the run, then started.

    python bench/link_soak.py --stones 4000 --label soak        # ~2 x 100 s of sorting, then the drain
    python bench/link_soak.py --stones 300 --work DIR --no-plot  # the short version (tests/test_link_e2e.py)

Two `sorterd run --config` processes with the same seed and the same sorting settings (the
shipped sim.toml, `[sim] clock = "wall"`, `rate_per_s` = 2 x 20, `[decision] sort_confidence`
raised to flag ~20 %: tests/linke2e.SOAK_SORT_CONFIDENCE): one with `[link]` disabled, one with
it enabled and `--link-drain`.  For the link run the trainer (`sorterd trainer`, keys from
`sorterd keys generate`) is started only once `--offline` of the expected sorting time has
passed.  Every `--every` s the sorter's VmRSS (/proc/<pid>/status) and the outbox's size on
disk are sampled.

Checked against the sorter's own records: the flagged = 1 classified rows of its stones.db,
each must be in the trainer's unlabelled.jsonl exactly once (lost, duplicated, extra counted),
and the outbox must be empty after the drain.  Sorting figures of both runs side by side
(deadline misses, passed unseen, landed as routed, flagged) -- on the wall clock of a shared box
the two runs' misses also differ by load alone, so both are reported, with the box's load.

Results: bench/results/link_soak_<label>.json, _rss.csv and _rss.png (the RSS and outbox size
over time, the trainer's start marked).  Figures go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import linke2e as L  # noqa: E402  (the e2e tests' helpers: one way to start the real processes)

NOMINAL_RATE = 20.0  # sorterd/configs/sim.toml [sim] rate_per_s


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("outbox.db*") if p.is_file()) if path.exists() else 0


def sorting(rate: float, seed: int) -> dict[str, dict[str, object]]:
    return {"decision": {"sort_confidence": L.SOAK_SORT_CONFIDENCE},
            "sim": {"clock": "wall", "rate_per_s": rate, "seed": seed}}


def run_sorter(cfg: Path, stones: int, summary: Path, every: float, drain_s: float,
               on_tick: Any = None) -> tuple[list[tuple[float, int, int]], float]:
    """`sorterd run` in a child, sampled every `every` s: [(t, rss_kb, outbox_bytes)], wall seconds."""
    args = ["--stones", str(stones), "--json", summary]
    if drain_s:
        args += ["--link-drain", str(drain_s)]
    t0 = time.monotonic()
    log = cfg.parent / "run.log"  # a file, not a pipe: a pipe nobody reads fills and stops the sorter
    with log.open("w") as f:
        proc = subprocess.Popen(L.run_args(cfg, *args), env=L.env(), stdout=f, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int, int]] = []
    outbox = cfg.parent / "outbox"
    while proc.poll() is None:
        rss = rss_kb(proc.pid)
        t = time.monotonic() - t0
        if rss is not None:
            samples.append((t, rss, dir_bytes(outbox)))
        if on_tick is not None:
            on_tick(t)
        time.sleep(every)
    if proc.returncode != 0:
        raise SystemExit(f"sorterd run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return samples, time.monotonic() - t0


def figures(s: dict[str, Any]) -> dict[str, Any]:
    keys = ("stones_fed", "objects_decided", "flagged", "deadline_misses", "passed_unseen", "landed_as_routed_rate",
            "landed_as_decided_rate")
    return {k: s.get(k) for k in keys}


def soak(work: Path, stones: int, rate: float, offline: float, seed: int, every: float, drain_s: float,
         trainer_nice: int) -> dict[str, Any]:
    keys = L.make_keys(work / "keys", ("sorter-1",))
    port = L.free_port()
    plain = L.sorter_config(work / "plain" / "s.toml", work / "plain", "sorter-1", keys, port, link=False,
                            sorting=sorting(rate, seed))
    linked = L.sorter_config(work / "link" / "s.toml", work / "link", "sorter-1", keys, port,
                             sorting=sorting(rate, seed))
    load_before = os.getloadavg()[0]
    plain_samples, plain_wall = run_sorter(plain, stones, work / "plain.json", every, 0)
    trainer = L.Trainer(work / "ds", keys, port, work / "trainer.log", nice=trainer_nice)
    started: list[float] = []  # when the trainer was started, s since the run began
    batch_t0: list[float] = []  # when the batch began (the model loaded): sorting time counts from here
    start_at = offline * stones / rate

    def tick(t: float) -> None:
        if not batch_t0 and any((work / "link" / "logs").glob("batch_*/stones.db")):
            batch_t0.append(t)
        if batch_t0 and not started and t - batch_t0[0] >= start_at:
            trainer.start()
            started.append(t)

    try:
        link_samples, link_wall = run_sorter(linked, stones, work / "link.json", every, drain_s, tick)
    finally:
        trainer.stop()
    load_after = os.getloadavg()[0]
    s_plain = json.loads((work / "plain.json").read_text())
    s_link = json.loads((work / "link.json").read_text())
    flagged = L.flagged_in_batches(work / "link" / "logs", "sorter-1")
    got = L.dataset_keys(work / "ds")
    rss = [r for _, r, _ in link_samples]
    return {
        "stones": stones, "rate_per_s": rate, "nominal_rate_per_s": NOMINAL_RATE, "seed": seed,
        "sort_confidence": L.SOAK_SORT_CONFIDENCE, "offline_fraction": offline, "trainer_nice": trainer_nice,
        "trainer_started_s": started[0] if started else None, "link_run_wall_s": round(link_wall, 2),
        "plain_run_wall_s": round(plain_wall, 2),
        "drain_s_after_trainer_start": round(link_wall - started[0], 2) if started else None,
        "flagged_in_stones_db": len(flagged), "in_dataset": len(got), "lost": len(flagged - set(got)),
        "duplicated": len(L.duplicates(got)), "extra": len(set(got) - flagged),
        "outbox_entries_after": L.outbox_entries(work / "link" / "outbox"),
        "link": {k: s_link["link"][k] for k in ("queued", "delivered", "dropped")} | {"client": s_link["link"]["client"]},
        "sorting_link_off": figures(s_plain), "sorting_link_on": figures(s_link),
        "rss_kb_link": {"first": rss[0], "max": max(rss), "last": rss[-1], "samples": len(rss)} if rss else None,
        "rss_kb_plain_max": max((r for _, r, _ in plain_samples), default=None),
        "outbox_bytes_max": max((b for _, _, b in link_samples), default=0),
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
        "samples": link_samples, "samples_plain": plain_samples,
    }


def write(result: dict[str, Any], results: Path, label: str, plot: bool) -> None:
    results.mkdir(parents=True, exist_ok=True)
    base = results / f"link_soak_{label}"
    with open(f"{base}_rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "t_s", "rss_kb", "outbox_bytes"])
        for run, key in (("link", "samples"), ("plain", "samples_plain")):
            w.writerows((run, f"{t:.2f}", r, b) for t, r, b in result[key])
    slim = {k: v for k, v in result.items() if not k.startswith("samples")}
    Path(f"{base}.json").write_text(json.dumps(slim, indent=2) + "\n")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for run, key in (("link on", "samples"), ("link off", "samples_plain")):
            ax.plot([t for t, _, _ in result[key]], [r / 1024 for _, r, _ in result[key]], label=f"sorter RSS, {run}")
        ax2 = ax.twinx()
        ax2.plot([t for t, _, _ in result["samples"]], [b / 1e6 for _, _, b in result["samples"]], "g:",
                 label="outbox.db size")
        ax2.set_ylabel("outbox on disk, MB")
        if result["trainer_started_s"] is not None:
            ax.axvline(result["trainer_started_s"], color="k", ls="--", label="trainer started")
        ax.set_xlabel("s since `sorterd run` started")
        ax.set_ylabel("VmRSS, MiB")
        ax.set_title(f"link soak: {result['stones']} stones at {result['rate_per_s']:g}/s, "
                     f"{result['flagged_in_stones_db']} flagged")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{base}_rss.png", dpi=100)
    print(json.dumps(slim, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stones", type=int, default=4000)
    p.add_argument("--rate", type=float, default=2 * NOMINAL_RATE, help="stones per second (default 2x nominal)")
    p.add_argument("--offline", type=float, default=0.8, help="fraction of the sorting time the trainer is off")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--every", type=float, default=0.5, help="RSS sampling period, s")
    p.add_argument("--drain", type=float, default=600.0, help="--link-drain of the link run, s")
    p.add_argument("--trainer-nice", type=int, default=0,
                   help="run the trainer under nice -n N (it stands for a trainer on its own PC; default 0)")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--label", default="soak")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, CSV and PNG go")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args()
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        result = soak(a.work, a.stones, a.rate, a.offline, a.seed, a.every, a.drain, a.trainer_nice)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(Path(tmp), a.stones, a.rate, a.offline, a.seed, a.every, a.drain, a.trainer_nice)
    write(result, a.results, a.label, not a.no_plot)


if __name__ == "__main__":
    main()
