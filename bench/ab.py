"""A/B: the same simulated runs on two revisions, interleaved, on this machine.

    python bench/ab.py --old f5ea075 --new HEAD --repeat 2 \
        --case "run --sim --stones 1000 --rate 20" \
        --case "run --sim --valves mcu --stones 3000 --rate 50"

Each revision is checked out into a temporary git worktree and run with the
current interpreter (`PYTHONPATH` = that worktree), so both sides share one
venv, one machine and the same minutes: runs alternate old, new, old, new …
so drift in machine load hits both alike.  Prints, per case, the median of
each figure over the repeats for both sides and the new/old ratio, and writes
every run's summary to `--out` (JSON).  A figure that got worse is marked.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# (JSON path, lower is better?)
FIGURES: list[tuple[str, bool]] = [
    ("stones_fed", False), ("stones_seen", False), ("objects_decided", False),
    ("deadline_misses", True), ("passed_unseen", True), ("lighting_faults", True),
    ("landed_as_decided_rate", False), ("landed_as_routed_rate", False), ("flagged_rate", True),
    ("accuracy.bin", False), ("accuracy.cost_weighted", False),
    ("latency_ms.compute.p50", True), ("latency_ms.compute.p99", True),
    ("latency_ms.model_only.p50", True), ("latency_ms.exposure_to_pulse.p99", True),
    ("wall_s", True),
]


def _get(summary: dict[str, Any], path: str) -> float | None:
    cur: Any = summary
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return float(cur) if isinstance(cur, (int, float)) else None


def _worktree(rev: str, root: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = root / sha
    subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO, check=True,
                   capture_output=True)
    return path


def _run_case(tree: Path, case: str, work: Path) -> dict[str, Any]:
    out = work / "summary.json"
    cmd = [sys.executable, "-m", "sorterd", *shlex.split(case), "--no-progress", "--json", str(out),
           "--log-dir", str(work / "logs")]
    r = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(tree)},
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{tree.name}: `{case}` exited {r.returncode}:\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--case", action="append", required=True, help="sorterd arguments, e.g. 'run --sim'")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ab.json"))
    args = ap.parse_args()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="sorterd-ab-") as tmp:
        root = Path(tmp)
        trees = {"old": _worktree(args.old, root), "new": _worktree(args.new, root)}
        try:
            for case in args.case:
                results[case] = {"old": [], "new": []}
                for i in range(args.repeat):
                    for side in ("old", "new"):
                        work = root / f"{side}-{len(results)}-{i}"
                        work.mkdir()
                        results[case][side].append(_run_case(trees[side], case, work))
                        print(f"{case!r} {side} #{i + 1} done", file=sys.stderr)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"old": args.old, "new": args.new, "results": results}, indent=2) + "\n")
    for case, sides in results.items():
        print(f"\n### `sorterd {case}` (median of {args.repeat}, old {args.old} vs new {args.new})\n")
        print("| figure | old | new | new/old |\n|---|---|---|---|")
        for path, lower_better in FIGURES:
            vals = {s: [v for r in runs if (v := _get(r, path)) is not None] for s, runs in sides.items()}
            if not vals["old"] or not vals["new"]:
                continue
            old, new = statistics.median(vals["old"]), statistics.median(vals["new"])
            ratio = f"{new / old:.2f}" if old else "-"
            worse = (new > old) if lower_better else (new < old)
            print(f"| {path} | {old:g} | {new:g} | {ratio}{' (worse)' if worse and old != new else ''} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
