"""Rebuild the default model bundle (models/default) with the trainer's own commands.

    pip install torch==2.13.0 && pip install -e '.[train]'
    python models/build_default.py --data /tmp/melee       # ~2.5 min data + ~15-30 min training, 2 cores

It is exactly this (see sorterd/sim/recipe.py for the lots and seeds):

    sorterd sim generate --out DATA --lot thai-mixed --stones 1000 --seed 1 --date 2026-03-02
    ... one line per lot: 4,500 stones in five training lots (domain-randomised: a new simulated
    machine every 150 stones, sorterd.sim.recipe.TRAIN_MACHINES), 1,200 in two test lots ...
    sorterd train --data DATA --out models/default --test-lots LOT-2026-006,LOT-2026-007 --seed 0 --force \
        --backbone-dropout 0.25   (the stats path: train's default)
    sorterd evaluate --model models/default --data DATA --report DATA/report

The model log entry goes to models/model_log.jsonl (beside the bundle); the
test figures are in the bundle's manifest ("metrics") and printed at the end.
Then `python models/add_golden.py GOLDEN_DATA` gives it its golden inputs (see there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sorterd.cli import main as sorterd
from sorterd.sim.recipe import TEST_LOTS, TRAIN_ARGS, TRAIN_SEED, generate_default_dataset

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset folder to write (must not exist yet)")
    ap.add_argument("--out", type=Path, default=HERE / "default", help="bundle to write (default models/default)")
    ap.add_argument("--version", help="model version (default: next after models/model_log.jsonl)")
    args = ap.parse_args()
    if args.data.exists():
        print(f"{args.data}: exists; give a new folder (the recipe's seeds make the same stones)", file=sys.stderr)
        return 2
    n = generate_default_dataset(args.data, progress=lambda s: print(s, flush=True))
    print(f"{args.data}: {n} stones")
    train = ["train", "--data", str(args.data), "--out", str(args.out), "--test-lots", ",".join(TEST_LOTS),
             "--seed", str(TRAIN_SEED), "--force", *TRAIN_ARGS, "--notes", "default bundle: models/build_default.py"]
    if args.version:
        train += ["--version", args.version]
    code = sorterd(train)
    if code:
        return code
    return sorterd(["evaluate", "--model", str(args.out), "--data", str(args.data),
                    "--report", str(args.data / "report")])  # the report folder has metrics.json too


if __name__ == "__main__":
    sys.exit(main())
