"""Few-label adaptation (§5.4) measured: `sorterd train --from` on 600 labelled stones of a new lot.

    python bench/adapt_new_lot.py --data /tmp/melee --from models/default --work /tmp/adapt \
        [--replay 600] [--epochs 8] [--epochs-heads 1] [--tag full]

--data is the dataset the bundle was trained on (`models/build_default.py`'s folder, with its
split snapshot); the shifted lot (`sorterd.sim.recipe.SHIFTED_LOT`, 1,400 stones, outside every
training machine's range in six ways) is generated into a working copy of it (labels, crops,
session metadata and the raw frames, hard-linked: every input is cut from its frames as the
bundle's were) and split by stone:

    train  540 of the first 600 new stones  + --replay old training stones (stratified, "nothing forgotten")
    val     60 of the first 600 new stones  + 60 old validation stones   (temperatures refitted on these)
    test   the other 800 new stones         + the old test lots (never seen by either model)

then `sorterd train --from BUNDLE --splits adaptN` fine-tunes (the trainer's own command), and
`sorterd evaluate` reports the new lot's 800 and the old test lots separately (two more split
snapshots with only those test stones).  Figures go to WORK/<tag>.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from sorterd.cli import main as sorterd
from sorterd.data.dataset import open_dataset
from sorterd.sim.recipe import SHIFTED_LOT, generate_shifted_lot
from sorterd.train.splits import read_splits

NEW_LABELLED = 600


def _copy_dataset(src: Path, dst: Path) -> None:
    """Labels, crops, session metadata and the raw frames (hard links where the file system allows:
    nothing here writes a frame), so the inputs are cut from the frames as the bundle's were
    (`sorterd train --crops auto`)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "labels.jsonl", dst / "labels.jsonl")
    shutil.copytree(src / "images" / "processed", dst / "images" / "processed")
    shutil.copytree(src / "sessions", dst / "sessions")
    if (src / "images" / "raw").is_dir():
        shutil.copytree(src / "images" / "raw", dst / "images" / "raw", copy_function=_link_or_copy)


def _link_or_copy(a: str, b: str) -> None:
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def _write(dst: Path, train: list[str], val: list[str], test: list[str], note: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (dst / f"{name}.txt").write_text("".join(f"{s}\n" for s in ids))
    (dst / "duplicates.txt").write_text("")
    (dst / "split_info.json").write_text(json.dumps({"made_by": "bench/adapt_new_lot.py", "note": note}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--from", dest="bundle", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--replay", type=int, default=600, help="old training stones mixed in (default 600)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--epochs-heads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tag", default="adapt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-splits", metavar="vNNN", help="the split snapshot of --data to take the old stones from "
                    "(default: the one the bundle was trained with)")
    args = ap.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    old = read_splits(open_dataset(args.data), args.old_splits or manifest["training"]["splits"]["version"])
    data = args.work / "data"
    if not data.exists():
        _copy_dataset(args.data, data)
        generate_shifted_lot(data)
    ds = open_dataset(data)
    new = sorted(lab.stone_id for lab in ds.labels if lab.lot_id == SHIFTED_LOT.lot_id)
    labelled, held = new[:NEW_LABELLED], new[NEW_LABELLED:]
    rng = np.random.default_rng(args.seed)
    replay = sorted(rng.choice(old.train, size=min(args.replay, len(old.train)), replace=False).tolist()) \
        if args.replay else []
    old_val = sorted(rng.choice(old.val, size=min(60, len(old.val)), replace=False).tolist())
    cut = int(round(0.9 * len(labelled)))
    version = f"adapt-{args.tag}"
    splits = data / "splits"
    _write(splits / version, labelled[:cut] + replay, labelled[cut:] + old_val, held + old.test,
           f"{len(labelled)} new-lot stones + {len(replay)} old training stones")
    _write(splits / f"{version}-new", [], [], held, "the new lot's other stones")
    _write(splits / f"{version}-old", [], [], list(old.test), "the old test lots")
    out = args.work / args.tag
    code = sorterd(["train", "--data", str(data), "--out", str(out), "--from", str(args.bundle),
                    "--splits", version, "--version", "v900", "--force", "--no-log", "--no-progress",
                    "--epochs", str(args.epochs), "--epochs-heads", str(args.epochs_heads), "--lr", str(args.lr),
                    "--seed", str(args.seed)])
    if code:
        return code
    figures = {}
    for which in ("new", "old"):
        rep = args.work / f"{args.tag}-{which}"
        code = sorterd(["evaluate", "--model", str(out), "--data", str(data), "--splits", f"{version}-{which}",
                        "--report", str(rep)])
        if code:
            return code
        m = json.loads((rep / "metrics.json").read_text())
        figures[which] = {k: m.get(k) for k in ("overall", "color", "clarity", "cost_weighted", "flagged_rate",
                                                "cut_purity", "cut_recall", "error_flag_recall", "ood_rate")}
        figures[which]["milestone"] = m["milestones"]["reached"]
    (args.work / f"{args.tag}.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
