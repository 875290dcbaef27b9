"""`sorterd retrain`: the §5.4 retraining run on the trainer's dataset (`sorterd.trainer.retrain`).

    sorterd retrain --data DIR --model BUNDLE            run if due (500 new labels, or weekly with >= 100)
    sorterd retrain --data DIR --model BUNDLE --now      run now (a request; --reason says why)
    sorterd retrain --data DIR --status                  print the status JSON and exit

Exit status: 0 nothing due, or a run that made a candidate release; 4 a run whose model was
refused (the reasons are printed); 2 bad input; 6 training or comparing failed; 75 another run
holds the dataset's retrain lock.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_FAILED, EXIT_BUSY = 2, 4, 6, 75


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("retrain", help="fine-tune on new labels and gate a candidate release (§5.4, §8.4)",
                       description="Count the labels the last model never saw; when due (or --now) run `sorterd "
                                   "train --from BUNDLE` on DIR, evaluate and compare on the held-out lots, and "
                                   "copy a model that is better on cost-weighted accuracy and meets §8.4 to "
                                   "DIR/releases/candidates/<version>/.")
    r.add_argument("--data", type=Path, required=True, metavar="DIR", help="the trainer's §7.1 dataset")
    r.add_argument("--model", type=Path, metavar="BUNDLE", help="the current model (fine-tuned from, compared with)")
    r.add_argument("--now", action="store_true", help="run now whatever the count (§5.4 on request)")
    r.add_argument("--reason", default="sorterd retrain --now", help="why, with --now (shown in the status)")
    r.add_argument("--status", action="store_true", help="print the status (JSON) and exit")
    r.add_argument("--test-lots", metavar="LOT[,LOT]", help="held-out lots for sorterd train (default: its choice)")
    r.add_argument("--train-args", default="", metavar="ARGS",
                   help="more `sorterd train` options, one shell-quoted string (e.g. '--epochs 4')")
    r.set_defaults(func=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    from sorterd.trainer import retrain as rt

    if args.status:
        print(json.dumps(rt.read_status(args.data), indent=2))
        return 0
    if args.model is None:
        print("sorterd retrain: error: --model BUNDLE is required (the current model), except with --status",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.now:
            rt.request_run(args.data, args.reason)
        reason, new = rt.due(args.data, args.model)
        if reason is None:
            print(f"{args.data}: {new} new labels; no retrain due (500, or weekly with >= 100, or --now)")
            return 0
        print(f"retraining: {reason}", flush=True)
        lots = [s for s in (args.test_lots or "").split(",") if s]
        status = rt.run_retrain(args.data, args.model, reason, test_lots=lots,
                                train_args=shlex.split(args.train_args))
    except (rt.RetrainError, ValueError) as exc:
        print(f"sorterd retrain: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except rt.RetrainBusy as exc:
        print(f"sorterd retrain: {exc}", file=sys.stderr)
        return EXIT_BUSY
    if status["state"] == "failed":
        print(f"sorterd retrain: failed: {status['error']}", file=sys.stderr)
        return EXIT_FAILED
    entry = status.get("log_entry") or {}
    print(f"{status.get('version')}: {entry.get('new_samples_since_last')} new labels in the §5.5 entry; "
          f"{status.get('comparison')}; {status.get('verdict')}")
    if status.get("refused"):
        print("not a candidate:\n  - " + "\n  - ".join(status["refused"]))
        return EXIT_REFUSED
    print(f"candidate release: {status['candidate']}")
    return 0
