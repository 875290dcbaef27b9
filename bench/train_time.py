"""Training time at the §1.1 Phase 2 size (4,500 stones), the way the default model is trained.

    python bench/train_time.py [--data DIR] [--threads 2] [--out bench/results/train_time.json]

Without --data it first writes the default model's dataset (sorterd/train/
recipe.py: 4,500 stones in five training lots + 1,200 in two held-out test
lots) into a temporary folder and times that separately.  Then it runs
exactly what `sorterd train` runs (dataset checks, de-duplication, lot-held-
out splits, loading, training with the default schedule, calibration,
export, evaluation of the test lots through onnxruntime) into a throw-away
bundle, and reports the wall time of each part.  The issue's budget: 20
minutes on this 2-core machine.  Results go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sorterd.sim.recipe import TEST_LOTS, TRAIN_SEED, generate_default_dataset
from sorterd.train.job import FitOptions, default_config, fit

BUDGET_S = 20 * 60


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="an existing copy of the default dataset (else generated)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, gen_s = args.data, None
        if data is None:
            data = Path(tmp) / "data"
            t0 = time.perf_counter()
            generate_default_dataset(data)
            gen_s = time.perf_counter() - t0
        load_before = os.getloadavg()
        opts = FitOptions(data=data, out=Path(tmp) / "bundle", test_lots=list(TEST_LOTS), write_log=False,
                          splits=None, version="vbench",
                          config=default_config(seed=TRAIN_SEED, threads=args.threads),
                          command="bench/train_time.py")
        # A fresh split snapshot name per run: the bench may reuse a dataset folder.
        opts.version = f"vbench{int(time.time())}"
        try:
            outcome = fit(opts, say=lambda s: print(s, flush=True) if " batch " not in s else None)
        finally:
            # The bench's split snapshot is not a model's: leave the dataset as it was.
            shutil.rmtree(data / "splits" / opts.version, ignore_errors=True)
        load_after = os.getloadavg()
    r = outcome.result
    m = outcome.test.metrics if outcome.test else {}
    full_epochs = [h for h in r.history if h.phase == "full"]
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "dataset_stones": len(outcome.splits.train) + len(outcome.splits.val) + len(outcome.splits.test),
        "train_val_stones": len(outcome.splits.train) + len(outcome.splits.val),
        "trained_on": r.n_train, "validated_on": r.n_val, "test_stones": len(outcome.splits.test),
        "generate_s": None if gen_s is None else round(gen_s, 1),
        "prepare_s": round(outcome.timings["prepare"], 1),
        "train_s": round(outcome.timings["train"], 1),
        "finish_s": round(outcome.timings["finish"], 1),
        "total_s": round(outcome.seconds, 1),
        "within_budget": outcome.seconds <= BUDGET_S,
        "epochs_run": r.epochs_run, "best_epoch": r.best_epoch, "stopped_early": r.stopped_early,
        "s_per_full_epoch": round(sum(h.seconds for h in full_epochs) / max(len(full_epochs), 1), 1),
        "train_samples_per_s": round(r.samples_per_second, 1),
        "test": {k: m.get(k) for k in ("overall", "color", "clarity", "cost_weighted", "flagged_rate",
                                       "cut_purity", "cut_recall", "ece")},
    }
    print(json.dumps(result, indent=2))
    print(f"sorterd train on {result['dataset_stones']} stones: {result['total_s'] / 60:.1f} min "
          f"(budget {BUDGET_S // 60} min: {'OK' if result['within_budget'] else 'OVER'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
