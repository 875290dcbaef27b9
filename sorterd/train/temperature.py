"""Confidence calibration, numpy only (§5.2): temperature scaling, ECE, reliability bins.

Used by the trainer (fitting temperatures on validation data) and by
`sorterd evaluate`, which must run without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    logp = log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(len(labels)), labels].mean())


T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T), T in 0.05..20.

    NLL is convex in 1/T, hence unimodal in log T: a golden-section search on
    log T finds the optimum without gradients.
    """
    z, y = _check_logits(logits, labels)
    if np.ptp(z, axis=1).max() == 0.0:
        return 1.0  # constant logits: every T gives the same probabilities

    def loss(log_t: float) -> float:
        return nll(z / math.exp(log_t), y)

    return math.exp(_golden_min(loss, math.log(T_MIN), math.log(T_MAX)))


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-6) -> float:
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def _check_logits(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(values, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or len(z) == 0 or y.shape != (len(z),):
        raise ValueError(f"expected N x K scores and N labels with N >= 1, got "
                         f"{tuple(z.shape)} and {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be integers in 0..{z.shape[1] - 1}")
    return z, y.astype(np.int64)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with n_bins equal-width confidence bins over (0, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: must be >= 1")
    p, y = _check_logits(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin: mean confidence, accuracy and count."""

    lo: float
    hi: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> list[ReliabilityBin]:
    """A reliability diagram's data: per confidence bin over (0, 1], mean confidence and accuracy.

    ECE over the same bins is sum(count * |accuracy - confidence|) / N.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, n,
                                  float(conf[sel].mean()) if n else None, float(ok[sel].mean()) if n else None))
    return out


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE of any confidence score against any notion of "right" (e.g. both heads right)."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b.count for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b.count * abs((b.accuracy or 0.0) - (b.confidence or 0.0)) for b in bins) / n)
