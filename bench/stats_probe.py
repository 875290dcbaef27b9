"""How far the whole-stone statistics alone carry the class (the probe behind v005, issue 14).

    python bench/stats_probe.py --data DATA --shift SHIFT [--test-lots LOT-2026-006,LOT-2026-007]

DATA: `models/build_default.py`'s dataset (domain-randomised training lots + the nominal test
lots); SHIFT: `sorterd.sim.recipe.generate_shifted_lot`'s.  The 13 numbers `StoneStats` gives the
head (`sorterd.train.mobilenet`), computed the same way in pixel units from the processed crops at
the model's 128 px (`load_crops`): per channel the background (mean of the four 8 px corner
patches) and the stone's mean (pixels differing from the background by > 0.15 summed over
channels), and the log of the stone's share of the crop.  A multinomial logistic regression per
head (torch LBFGS, standardised features, L2 1e-3) is fitted on every classified stone of the
training lots and scored on the test lots and the shifted lot.  Variants: "abs" (the 13 numbers),
"abs+ratio" (+ log stone/background per channel), "ratio+bg" (ratios and backgrounds only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sorterd.data.dataset import StoneLabel, load_crops, open_dataset

CORNER = 8
STONE_DIFF = 0.15


def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 6) uint8 -> (the 13 StoneStats numbers, the 6 log stone/background ratios)."""
    f = x.astype(np.float32) / 255.0
    c = CORNER
    corners = np.concatenate([f[:, :c, :c], f[:, :c, -c:], f[:, -c:, :c], f[:, -c:, -c:]], axis=2)
    bg = corners.mean(axis=(1, 2))
    mask = (np.abs(f - bg[:, None, None, :]).sum(axis=3) > STONE_DIFF).astype(np.float32)
    stone = (f * mask[..., None]).sum(axis=(1, 2)) / (mask.sum(axis=(1, 2))[:, None] + 1.0)
    share = np.log(mask.mean(axis=(1, 2)) + 1e-3)[:, None]
    return np.concatenate([stone, bg, share], 1), np.log((stone + 1e-2) / (bg + 1e-2))


def fit(x: np.ndarray, y: np.ndarray, classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A multinomial logistic regression; returns its argmax predictor."""
    xt, yt = torch.tensor(x), torch.tensor(y)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin((xt - mu) / sd), yt) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    return lambda z: lin((torch.tensor(z) - mu) / sd).argmax(1).detach().numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--shift", type=Path, required=True)
    ap.add_argument("--test-lots", default="LOT-2026-006,LOT-2026-007")
    args = ap.parse_args()
    test_lots = set(args.test_lots.split(","))
    ds, shifted = open_dataset(args.data, check_images=False), open_dataset(args.shift, check_images=False)
    labs = [lab for lab in ds.labels if lab.classified]
    parts: dict[str, tuple[object, list[StoneLabel]]] = {
        "train": (ds, [lab for lab in labs if lab.lot_id not in test_lots]),
        "test": (ds, [lab for lab in labs if lab.lot_id in test_lots]),
        "shift": (shifted, [lab for lab in shifted.labels if lab.classified])}
    if not parts["train"][1] or not parts["test"][1] or not parts["shift"][1]:
        print("stats_probe: a part has no classified stones (check --test-lots)", file=sys.stderr)
        return 2
    blocks = {}
    for name, (d, lab) in parts.items():
        a, r = features(load_crops(d, lab, 128))  # type: ignore[arg-type]
        blocks[name] = ({"abs": a, "abs+ratio": np.concatenate([a, r], 1), "ratio+bg": np.concatenate([r, a[:, 6:12]], 1)},
                        np.array([x.color_index for x in lab]), np.array([x.clarity_index for x in lab]))
    print(f"stones: train {len(parts['train'][1])}, test {len(parts['test'][1])}, shift {len(parts['shift'][1])}")
    for variant in ("abs", "abs+ratio", "ratio+bg"):
        out = []
        for head, k in (("colour", 1), ("clarity", 2)):
            predict = fit(blocks["train"][0][variant], blocks["train"][k], 3)
            acc = {n: float(np.mean(predict(blocks[n][0][variant]) == blocks[n][k])) for n in ("test", "shift", "train")}
            out.append(f"{head}: test {acc['test']:.3f} shift {acc['shift']:.3f} train {acc['train']:.3f}")
        print(f"{variant:10s} " + " | ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
