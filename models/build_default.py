"""Build the default model bundle (models/default) from simulated stones.

    pip install torch==2.13.0 && pip install -e '.[train]'
    python models/build_default.py                    # ~10 min on 2 cores

Stones come from the simulated machine and are cut by the daemon's own
segmentation (`sorterd.sim.dataset`), so the model sees exactly what the
pipeline feeds it.  Train, validation and test stones come from different
world seeds (different stones, different sessions).  Temperatures are fitted
on validation, the figures are measured on the held-out test seed, and the
bundle plus a models/model_log.jsonl entry are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sorterd import config
from sorterd.sim.dataset import LabelledCrops, labelled_crops
from sorterd.train.export import export_bundle
from sorterd.train.trainer import (
    TrainConfig,
    TrainData,
    expected_calibration_error,
    fit_temperature,
    predict_logits,
    train,
)

HERE = Path(__file__).resolve().parent
CROP_MM = 6.4
SIZE = 128


def as_train_data(d: LabelledCrops) -> TrainData:
    return TrainData(np.ascontiguousarray(d.x.transpose(0, 3, 1, 2)), d.color, d.clarity)


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-stones", type=int, default=3000)
    ap.add_argument("--val-stones", type=int, default=600)
    ap.add_argument("--test-stones", type=int, default=1000)
    ap.add_argument("--epochs-heads", type=int, default=2)
    ap.add_argument("--epochs-full", type=int, default=12)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default="v001")
    ap.add_argument("--out", type=Path, default=HERE / "default")
    args = ap.parse_args()

    cfg = config.load(config.sim_config_path())
    t0 = time.monotonic()
    train_set = labelled_crops(cfg, args.train_stones, 1000 + args.seed, CROP_MM, SIZE)
    val_set = labelled_crops(cfg, args.val_stones, 2000 + args.seed, CROP_MM, SIZE)
    test_set = labelled_crops(cfg, args.test_stones, 3000 + args.seed, CROP_MM, SIZE)
    print(f"data: train {len(train_set.x)}, val {len(val_set.x)}, test {len(test_set.x)} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)

    tcfg = TrainConfig(epochs_heads=args.epochs_heads, epochs_full=args.epochs_full,
                       width_mult=args.width, seed=args.seed)
    result = train(as_train_data(train_set), as_train_data(val_set), tcfg,
                   progress=lambda line: print(line, flush=True))
    mean, std = result.mean, result.std

    vc, vk = predict_logits(result.model, as_train_data(val_set).x, mean, std)
    temps = {"color": fit_temperature(vc, val_set.color), "clarity": fit_temperature(vk, val_set.clarity)}
    tc, tk = predict_logits(result.model, as_train_data(test_set).x, mean, std)
    pc, pk = softmax(tc, temps["color"]), softmax(tk, temps["clarity"])
    metrics = {
        "test_stones": len(test_set.x),
        "color": round(float((pc.argmax(1) == test_set.color).mean()), 4),
        "clarity": round(float((pk.argmax(1) == test_set.clarity).mean()), 4),
        "overall": round(float(((pc.argmax(1) == test_set.color) & (pk.argmax(1) == test_set.clarity)).mean()), 4),
        "ece_color": round(expected_calibration_error(pc, test_set.color), 4),
        "ece_clarity": round(expected_calibration_error(pk, test_set.clarity), 4),
    }
    training = result.summary()
    training["command"] = "python models/build_default.py " + " ".join(sys.argv[1:])
    training["data"] = {"source": "sorterd simulator (sorterd.sim.dataset.labelled_crops)",
                        "train_seed": 1000 + args.seed, "val_seed": 2000 + args.seed, "test_seed": 3000 + args.seed}
    export_bundle(result.model, args.out, version=args.version, mean=mean, std=std, crop_mm=CROP_MM,
                  temperatures=temps, metrics=metrics, training=training)
    entry = {"version": args.version, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "training_samples": len(train_set.x), "epochs": result.epochs_run,
             "test_accuracy_color": metrics["color"], "test_accuracy_clarity": metrics["clarity"],
             "test_accuracy_combined": metrics["overall"], "temperatures": temps,
             "training_seconds": round(result.seconds, 1), "notes": training["command"]}
    with open(HERE / "model_log.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"bundle written to {args.out} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
