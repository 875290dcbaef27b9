"""The decision policy: class probabilities (+ size) -> bin, confidence, flag.

§5.2: combined confidence = min(max p_color, max p_clarity);
  >= sort_confidence           -> sort by the §8.2 mapping, not flagged
  flag_confidence .. sort      -> sort by the mapping, flagged for review
  <  flag_confidence           -> low_confidence_bin (SELECT), flagged
§8.2: CUT also needs size >= cut_min_size_mm, else small_cut_bin.
Out of distribution (the bundle's OOD gate, `sorterd.train.ood`): a stone whose
score exceeds the manifest's stone_limit goes to low_confidence_bin (SELECT),
flagged, whatever its softmax says -- a model off its training data is often
confidently wrong, and §5.2's confidence cannot tell.
Objects that are not one classifiable stone take the machine's safe route.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sorterd.config import DecisionConfig


@dataclass(frozen=True)
class Decision:
    bin: str
    color: str | None
    clarity: str | None
    confidence: float
    flagged: bool
    reason: str


def class_bin(color: str, clarity: str, size_mm: float, cfg: DecisionConfig) -> str:
    """§8.2 mapping with the size rule for CUT."""
    b = str(cfg.bins[color][clarity])
    if b == "CUT" and size_mm < cfg.cut_min_size_mm:
        return cfg.small_cut_bin
    return b


def decide(
    p_color: np.ndarray,
    p_clarity: np.ndarray,
    size_mm: float,
    cfg: DecisionConfig,
    color_classes: tuple[str, ...],
    clarity_classes: tuple[str, ...],
    ood: float | None = None,
    ood_limit: float = 1.0,
    drifted: bool = False,
) -> Decision:
    ic, ik = int(np.argmax(p_color)), int(np.argmax(p_clarity))
    color, clarity = color_classes[ic], clarity_classes[ik]
    confidence = float(min(p_color[ic], p_clarity[ik]))
    if ood is not None and not ood <= ood_limit:  # NaN counts as out
        return Decision(cfg.low_confidence_bin, color, clarity, confidence, True,
                        f"out of distribution: score {ood:.2f} > {ood_limit:g}")
    if confidence < cfg.flag_confidence:
        return Decision(cfg.low_confidence_bin, color, clarity, confidence, True, "low confidence")
    b = class_bin(color, clarity, size_mm, cfg)
    if drifted and (cfg.on_drift == "hold-all" or (cfg.on_drift == "hold-cut" and b == "CUT")):
        # The batch is outside what the model knows (sorting/drift.py): a stone just inside the
        # per-stone limit is most likely of the same shifted lot, and CUT is where a wrong stone
        # costs most (§8.2 costs, §8.4 item 2) -- held for review until the batch is back.
        return Decision(cfg.low_confidence_bin, color, clarity, confidence, True,
                        f"batch drifted: {b} held (decision.on_drift = {cfg.on_drift})")
    flagged = confidence < cfg.sort_confidence
    return Decision(b, color, clarity, confidence, flagged, "review" if flagged else "sorted")


def safe_route(safe_bin: str, reason: str) -> Decision:
    """An object that must not be sorted as a stone (cluster, debris, fault)."""
    return Decision(safe_bin, None, None, 0.0, False, reason)


def unsortable_reason(size_mm: float, length_mm: float, cluster_reason: str, cfg: DecisionConfig) -> str:
    """Why an observed object cannot be classified as one stone ('' if it can)."""
    if cluster_reason:
        return cluster_reason
    if size_mm < cfg.min_size_mm:
        return f"debris: {size_mm:.2f} mm, below decision.min_size_mm"
    if length_mm > cfg.max_single_length_mm or size_mm > cfg.max_size_mm:
        return f"oversize: {size_mm:.2f} x {length_mm:.2f} mm"
    return ""
