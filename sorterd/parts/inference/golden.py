"""Golden-input parity: does a backend give the bundle's own answers? (DESIGN §4, §4a QA)

A bundle's golden inputs are raw crops and its golden outputs the logits onnxruntime gave
at export (`sorterd.data.bundle.read_golden`).  `check_golden` runs any `Model` on them and
compares, per stone: the probabilities within `atol` (absolute; FP16 engines get
`GOLDEN_ATOL["fp16"]`), the argmax of each head, and the §5.2/§8.2 bin `decide` gives at a
nominal sortable size.  The TensorRT backend refuses an engine that fails it; the
signed-release QA uses the same function.

Golden rows are chosen at export by `stable_rows`: stones whose top-two margins and whose
distance from the §5.2 thresholds are wide enough that a faithful FP16 engine cannot flip
the class or the bin -- so a flip means a broken engine, not rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sorterd.config import DecisionConfig
from sorterd.data.bundle import Manifest, read_golden, softmax
from sorterd.parts.inference import Model
from sorterd.sorting.decide import decide

# Absolute tolerance on probabilities.  FP32 engines agree with onnxruntime to ~1e-5; FP16
# ones (10-bit mantissa through ~50 layers) to ~1e-3..1e-2 on these models.
GOLDEN_ATOL = {"fp32": 1e-3, "fp16": 2e-2}
# A golden row's least margin (top-1 minus top-2 probability, and |confidence - threshold|):
# several times the FP16 tolerance, so parity failures are real.
STABLE_MARGIN = 0.1


def nominal_size_mm(cfg: DecisionConfig) -> float:
    """The size at which golden bins are compared: sortable, and big enough for CUT."""
    return max(cfg.cut_min_size_mm, cfg.min_size_mm) + 0.5


def _bins(p_color: np.ndarray, p_clarity: np.ndarray, m: Manifest, cfg: DecisionConfig) -> list[str]:
    size = nominal_size_mm(cfg)
    return [decide(pc, pk, size, cfg, m.color_classes, m.clarity_classes).bin for pc, pk in zip(p_color, p_clarity, strict=True)]


def golden_probabilities(logits: np.ndarray, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(N, 6) golden logits -> each head's probabilities, with the manifest's temperatures."""
    t = manifest.temperature
    return softmax(logits[:, :3], t["color"]), softmax(logits[:, 3:], t["clarity"])


def check_golden(model: Model, bundle: Path, atol: float = GOLDEN_ATOL["fp32"],
                 decision: DecisionConfig | None = None) -> list[str]:
    """What differs between `model` on the bundle's golden inputs and its golden outputs (empty: parity).

    A bundle without golden files is itself a problem: parity cannot be shown."""
    cfg = decision or DecisionConfig()
    golden = read_golden(bundle, model.manifest)
    if golden is None:
        return [f"{bundle}: carries no golden inputs/outputs (manifest 'golden'): parity cannot be checked; "
                "re-export the bundle (sorterd.train.export.write_golden)"]
    crops, logits = golden
    want_c, want_k = golden_probabilities(logits, model.manifest)
    preds, _ = model.predict(crops)
    got_c = np.stack([p.p_color for p in preds])
    got_k = np.stack([p.p_clarity for p in preds])
    problems: list[str] = []
    worst = float(max(np.abs(got_c - want_c).max(), np.abs(got_k - want_k).max()))
    if not worst <= atol:
        problems.append(f"probabilities differ from the golden outputs by up to {worst:.3g} (allowed {atol:g})")
    for head, got, want in (("color", got_c, want_c), ("clarity", got_k, want_k)):
        flips = np.flatnonzero(got.argmax(1) != want.argmax(1))
        if flips.size:
            problems.append(f"{head} argmax differs on {flips.size} of {len(crops)} golden inputs (rows {flips[:5].tolist()})")
    got_bins, want_bins = _bins(got_c, got_k, model.manifest, cfg), _bins(want_c, want_k, model.manifest, cfg)
    moved = [i for i, (a, b) in enumerate(zip(got_bins, want_bins, strict=True)) if a != b]
    if moved:
        i = moved[0]
        problems.append(f"bin differs on {len(moved)} of {len(crops)} golden inputs (row {i}: {got_bins[i]}, golden {want_bins[i]})")
    return problems


def stable_rows(logits: np.ndarray, manifest: Manifest, decision: DecisionConfig | None = None,
                margin: float = STABLE_MARGIN) -> np.ndarray:
    """Indices of rows whose class and bin are far from every decision edge (golden candidates)."""
    cfg = decision or DecisionConfig()
    pc, pk = golden_probabilities(logits, manifest)
    keep = np.ones(len(logits), dtype=bool)
    for p in (pc, pk):
        top2 = np.sort(p, axis=1)[:, -2:]
        keep &= (top2[:, 1] - top2[:, 0]) >= margin
    confidence = np.minimum(pc.max(1), pk.max(1))
    for threshold in (cfg.flag_confidence, cfg.sort_confidence):
        keep &= np.abs(confidence - threshold) >= margin / 2
    return np.flatnonzero(keep)
