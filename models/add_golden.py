"""Give a bundle golden inputs/outputs (golden_inputs.npy, golden_outputs.npy) through the export path.

    python models/add_golden.py DATA_DIR [--bundle models/default]

DATA_DIR is a §7.1 dataset (e.g. `sorterd sim generate --out /tmp/g --stones 80 --lot thai-mixed
--seed 13 --date 2026-03-02`, which is how models/default's were made); its ROI crops are fed to
`sorterd.train.export.write_golden`, which keeps the stones far from every decision edge and
stores onnxruntime's logits on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sorterd.data.bundle import read_manifest
from sorterd.data.dataset import load_crops, open_dataset
from sorterd.train.export import write_golden

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a §7.1 dataset folder")
    ap.add_argument("--bundle", type=Path, default=HERE / "default")
    args = ap.parse_args()
    ds = open_dataset(args.data)
    size = read_manifest(args.bundle).size[0]
    crops = load_crops(ds, ds.labels, size)
    kept = write_golden(args.bundle, crops)
    print(f"{args.bundle}: {kept} golden rows from {len(crops)} crops of {args.data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
