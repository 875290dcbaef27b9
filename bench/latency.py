"""Pipeline latency vs the bare model, measured in one run on the wall clock.

    python bench/latency.py --stones 1000 --rate 20 [--out bench/results/latency.json]

Runs the simulated sorter on the *wall* clock (real time, real sleeps), then
reports per-stage p50/p99 and the ratio compute/model_only, both measured in
the same run.  Results are appended to bench/RESULTS.md by hand, with the
machine they came from; this machine is shared and noisy, so read medians.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
from pathlib import Path

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunOptions, run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stones", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "virtual"), default="wall")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config.sim_config_path(), {
            "sim": {"rate_per_s": args.rate, "seed": args.seed, "clock": args.clock},
            "record": {"log_dir": tmp}, "metrics": {"port": 0}})
        s = run(cfg, RunOptions(stones=args.stones, progress=False), io.StringIO()).summary
    lat = s["latency_ms"]
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "stones": args.stones, "rate": args.rate, "clock": args.clock,
        "latency_ms": lat,
        "compute_over_model_p50": round(lat["compute"]["p50"] / lat["model_only"]["p50"], 3),
        "deadline_misses": s["deadline_misses"],
        "landed_as_decided_rate": s["landed_as_decided_rate"],
        "wall_s": s["wall_s"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
