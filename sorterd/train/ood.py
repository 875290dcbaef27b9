"""The out-of-distribution gate, trainer side: how far a stone is from everything the model learnt.

§5.2's confidence gate trusts the softmax, and a model shown a machine or a lot it
never saw (another scale, another light, another texture) is often confidently
wrong.  This gate measures the input itself against the training set, in the
model's own feature space (the head's input, `MobileNetV3Small.head_features`):

* **features**: class-conditional Mahalanobis distance (one mean per combined
  colour x clarity class, one shared covariance with shrinkage; Lee et al. 2018),
  the smallest over the classes -- "how unlike the nearest class of training
  stones is this one";
* **input statistics**: the same on the `StoneStats` numbers alone (stone and
  background level per channel and lighting mode, stone share of the crop) --
  lighting, grey card, exposure and tint against the training machines.  Absent
  for a model without the stone-statistics branch.

Each distance is divided by its own limit, the `quantile` of the validation
stones' distances (stones the model did not train on, from the training lots), and
the score is the larger of the two: score > 1 is "further out than 99.5 % of known
stones" on one of them.  The score is computed inside the ONNX graph (`OodScore`,
a third output ``ood_score``; plain MatMul / ReduceMin), so the sorter needs nothing
but the manifest's ``ood`` section (`sorterd.data.bundle`) to use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sorterd.train.mobilenet import MobileNetV3Small

QUANTILE = 0.995  # a validation stone is over the stone limit on one signal 0.5 % of the time
SHRINKAGE = 0.1  # covariance shrinkage towards its mean variance: 589 features, a few thousand stones
BATCH_SHARE_LIMIT = 0.10  # a batch with more than 10 % of stones over the limit has drifted
BATCH_MIN_STONES = 50  # ... judged over at least this many stones
MIN_PER_CLASS = 2  # a class with fewer fitting stones has no mean of its own


@dataclass(frozen=True)
class Gaussians:
    """Class means and one shared precision matrix of some feature columns."""

    columns: tuple[int, int]  # [start, stop) of the head's input
    means: np.ndarray  # (K, d)
    precision: np.ndarray  # (d, d)
    limit: float  # the validation quantile of the distance

    def distance(self, feats: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, per row (numpy reference)."""
        x = feats[:, self.columns[0]:self.columns[1]].astype(np.float64)
        d = x[:, None, :] - self.means[None, :, :]
        return np.einsum("nkd,de,nke->nk", d, self.precision, d).min(axis=1)


def fit_gaussians(feats: np.ndarray, classes: np.ndarray, columns: tuple[int, int],
                  shrinkage: float = SHRINKAGE) -> Gaussians:
    """Class means and the shrunk pooled within-class covariance of feats[:, columns]."""
    x = feats[:, columns[0]:columns[1]].astype(np.float64)
    kept = [k for k in np.unique(classes) if (classes == k).sum() >= MIN_PER_CLASS]
    if not kept:
        raise ValueError(f"OOD fit: no class has {MIN_PER_CLASS} stones or more ({len(x)} stones)")
    means = np.stack([x[classes == k].mean(axis=0) for k in kept])
    centred = np.concatenate([x[classes == k] - means[i] for i, k in enumerate(kept)])
    cov = centred.T @ centred / max(1, len(centred) - len(kept))
    d = cov.shape[0]
    target = np.trace(cov) / d
    cov = (1.0 - shrinkage) * cov + shrinkage * target * np.eye(d)
    return Gaussians(columns, means, np.linalg.inv(cov), 1.0)


def head_features(model: MobileNetV3Small, x_uint8: np.ndarray, mean: list[float], std: list[float],
                  batch: int = 256) -> np.ndarray:
    """The head's input (pooled backbone features, then the stone statistics) for N x 6 x H x W uint8."""
    from sorterd.train.loop import normalize, to_unit

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x_uint8), batch):
            xb = normalize(to_unit(torch.from_numpy(np.ascontiguousarray(x_uint8[i:i + batch]))), mean, std)
            out.append(model.head_features(xb).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


@dataclass(frozen=True)
class OodFit:
    """What the exporter puts in the graph and the manifest."""

    gates: tuple[Gaussians, ...]  # features, then input statistics (if the model has them)
    val_rate: float  # share of validation stones with score > 1 (~ what a known lot sends to SELECT)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The gate's score per row of head features (numpy reference of `OodScore`)."""
        return np.max([g.distance(feats) / g.limit for g in self.gates], axis=0)

    def manifest(self) -> dict[str, Any]:
        return {"output": "ood_score", "stone_limit": 1.0, "batch_share_limit": BATCH_SHARE_LIMIT,
                "batch_min_stones": BATCH_MIN_STONES, "quantile": QUANTILE,
                "signals": ["features", "input_statistics"][:len(self.gates)],
                "validation_over_limit": round(self.val_rate, 5)}


def fit_ood(model: MobileNetV3Small, train_x: np.ndarray, train_classes: np.ndarray, val_x: np.ndarray,
            mean: list[float], std: list[float]) -> OodFit:
    """Fit the gate on the training stones (un-augmented), set its limits on the validation stones."""
    ft = head_features(model, train_x, mean, std)
    fv = head_features(model, val_x, mean, std)
    n_all = ft.shape[1]
    spans = [(0, n_all)]
    if model.stats is not None:
        spans.append((n_all - model.stats.out_features, n_all))
    gates = []
    for span in spans:
        g = fit_gaussians(ft, train_classes, span)
        limit = float(np.quantile(g.distance(fv), QUANTILE)) if len(fv) else float(np.quantile(g.distance(ft), QUANTILE))
        gates.append(Gaussians(g.columns, g.means, g.precision, max(limit, 1e-6)))
    fit = OodFit(tuple(gates), 0.0)
    rate = float((fit.score(fv) > 1.0).mean()) if len(fv) else 0.0
    return OodFit(fit.gates, rate)


class OodScore(nn.Module):
    """The gate as graph operations on the head's input: (N, F) -> (N,) score."""

    def __init__(self, fit: OodFit) -> None:
        super().__init__()
        self.spans = [g.columns for g in fit.gates]
        for i, g in enumerate(fit.gates):
            p = torch.as_tensor(g.precision / g.limit, dtype=torch.float32)
            m = torch.as_tensor(g.means, dtype=torch.float32)
            self.register_buffer(f"p{i}", p)
            self.register_buffer(f"mp{i}", m @ p)  # (K, d)
            self.register_buffer(f"c{i}", ((m @ p) * m).sum(dim=1))  # (K,)

    def forward(self, feats: Tensor) -> Tensor:
        scores = []
        for i, (a, b) in enumerate(self.spans):
            x = feats[:, a:b]
            quad = ((x @ getattr(self, f"p{i}")) * x).sum(dim=1, keepdim=True)
            d = quad - 2.0 * (x @ getattr(self, f"mp{i}").T) + getattr(self, f"c{i}")[None, :]
            scores.append(d.min(dim=1).values)
        return torch.stack(scores, dim=1).max(dim=1).values


class WithOod(nn.Module):
    """The classifier plus its gate: (color_logits, clarity_logits, ood_score), for export."""

    def __init__(self, model: MobileNetV3Small, fit: OodFit) -> None:
        super().__init__()
        self.model = model
        self.ood = OodScore(fit)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.model.head_features(x)
        color, clarity = self.model.head(feats)
        return color, clarity, self.ood(feats)
