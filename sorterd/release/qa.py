"""The QA gate a verified release must pass before it may go live (§8.4 item 6; DESIGN §4a).

1. **golden**: the model, opened by the sorter's own backend, reproduces the bundle's recorded
   outputs on its recorded inputs (`sorterd.parts.inference.golden.check_golden`, the same code
   the TensorRT engine's parity check runs): catches a broken export or a different runtime.
2. **reference-kit**: on the reference stone kit's recorded crops and labels the model's argmax
   (color, clarity) agrees with the label on at least `min_agreement` of the stones (0.90, the
   calibration step's `AGREEMENT_MIN`).

`qa_problems` returns `(check, detail)` pairs; empty means the gate is passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorterd.config import DecisionConfig
from sorterd.parts.inference import Model
from sorterd.parts.inference.golden import GOLDEN_ATOL, check_golden


@dataclass(frozen=True)
class RecordedKit:
    """The reference kit as recorded: (N, H, W, 6) uint8 crops in the manifest's channel order and
    each stone's (color, clarity) label, in feeding order."""

    crops: np.ndarray
    labels: list[tuple[str, str]]

    def __post_init__(self) -> None:
        if self.crops.ndim != 4 or self.crops.shape[-1] != 6 or len(self.crops) != len(self.labels) or not self.labels:
            raise ValueError(f"a recorded kit is N crops (N, H, W, 6) and N labels; got {self.crops.shape} "
                             f"and {len(self.labels)} labels")


def kit_agreement(model: Model, kit: RecordedKit) -> float:
    """Fraction of the kit whose predicted (color, clarity) is its label."""
    preds, _ = model.predict(kit.crops)
    m = model.manifest
    got = [(m.color_classes[int(np.argmax(p.p_color))], m.clarity_classes[int(np.argmax(p.p_clarity))]) for p in preds]
    return sum(g == want for g, want in zip(got, kit.labels, strict=True)) / len(kit.labels)


def qa_problems(model: Model, bundle: Path, kit: RecordedKit | None, decision: DecisionConfig,
                min_agreement: float = 0.90, atol: float = GOLDEN_ATOL["fp32"]) -> list[tuple[str, str]]:
    """The gate's failures as (check, detail); a missing kit is a failure (the gate cannot be shown)."""
    problems = [("golden", p) for p in check_golden(model, bundle, atol, decision)]
    if kit is None:
        problems.append(("reference-kit", "no recorded reference kit: record it with the calibration's "
                         "reference-stone step before a release may go live"))
        return problems
    rate = kit_agreement(model, kit)
    if rate < min_agreement:
        problems.append(("reference-kit", f"{rate:.0%} of {len(kit.labels)} reference stones agree with their "
                         f"labels (< {min_agreement:.0%}, §8.4)"))
    return problems
