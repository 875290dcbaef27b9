"""The QA gate a verified release must pass before it may go live (§8.4 item 6; DESIGN §4a).

1. **golden**: the model, opened by the sorter's own backend, reproduces the bundle's recorded
   outputs on its recorded inputs (`sorterd.parts.inference.golden.check_golden`, the same code
   the TensorRT engine's parity check runs): catches a broken export or a different runtime.
2. **reference-kit**: on the reference stone kit's recorded crops and labels the model's argmax
   (color, clarity) agrees with the label on at least `min_agreement` of the stones (0.90, the
   calibration step's `AGREEMENT_MIN`).

`qa_problems` returns `(check, detail)` pairs; empty means the gate is passed.

The kit on disk: calibration's reference-stone step (`sorterd.calibration.checklist`) writes the
crops it fed the model and their labels to `<calibration.dir>/<machine>/<date>/kit.npz`
(`save_kit`: one numpy archive, no pickle, written by atomic rename with fsync); the gate reads
the newest one (`latest_kit`, `load_kit`).  Its crops are at the model input size and crop_mm of
the bundle that ran the calibration: a release with another input geometry cannot be judged on
them (refused naming `reference-kit`: record the kit again).  `KitPolicy` is what the sorter's
`[models]` says: where the kit is, whether a missing one refuses (`require_kit`), the threshold.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorterd.config import DecisionConfig
from sorterd.data.files import write_bytes_atomic
from sorterd.parts.inference import Model
from sorterd.parts.inference.golden import GOLDEN_ATOL, check_golden


@dataclass(frozen=True)
class RecordedKit:
    """The reference kit as recorded: (N, H, W, 6) uint8 crops in the manifest's channel order and
    each stone's (color, clarity) label, in feeding order."""

    crops: np.ndarray
    labels: list[tuple[str, str]]
    crop_mm: float | None = None  # the physical crop the crops were cut at (None: not recorded)

    def __post_init__(self) -> None:
        if self.crops.ndim != 4 or self.crops.shape[-1] != 6 or len(self.crops) != len(self.labels) or not self.labels:
            raise ValueError(f"a recorded kit is N crops (N, H, W, 6) and N labels; got {self.crops.shape} "
                             f"and {len(self.labels)} labels")


KIT_FILE = "kit.npz"


def save_kit(path: Path, kit: RecordedKit) -> Path:
    """Write `kit` as one .npz (crops uint8, labels as text, crop_mm), atomically and durably."""
    buf = io.BytesIO()
    np.savez(buf, crops=np.ascontiguousarray(kit.crops, dtype=np.uint8), labels=np.array(kit.labels, dtype=str),
             crop_mm=np.array(-1.0 if kit.crop_mm is None else kit.crop_mm))
    write_bytes_atomic(path, buf.getvalue())
    return path


def load_kit(path: Path) -> RecordedKit:
    """A kit written by `save_kit`; ValueError (one line: the file and what is wrong) otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            crops, labels, crop_mm = z["crops"], z["labels"], float(z["crop_mm"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a recorded reference kit ({exc}); record it again with sorterd calibrate") from None
    if crops.dtype != np.uint8 or labels.ndim != 2 or labels.shape[1:] != (2,):
        raise ValueError(f"{path}: a recorded kit is uint8 crops and (N, 2) labels; got {crops.dtype} crops and "
                         f"labels of shape {labels.shape}")
    return RecordedKit(crops, [(str(c), str(k)) for c, k in labels], None if crop_mm < 0 else crop_mm)


def latest_kit(calibration_dir: Path, machine: str) -> Path | None:
    """The newest `<calibration_dir>/<machine>/<date>/kit.npz` (dates sort as text), or None."""
    root = calibration_dir / machine
    found = sorted(root.glob(f"*/{KIT_FILE}")) if root.is_dir() else []
    return found[-1] if found else None


@dataclass(frozen=True)
class KitPolicy:
    """The `[models]` side of the reference-kit check: where the kit is, whether none refuses."""

    find: Callable[[], Path | None]
    require: bool = True
    min_agreement: float = 0.90

    def load(self) -> tuple[RecordedKit | None, str]:
        """The kit (None when there is none) and where it came from; blocking file work."""
        path = self.find()
        if path is None:
            return None, ""
        return load_kit(path), str(path)


def kit_agreement(model: Model, kit: RecordedKit) -> float:
    """Fraction of the kit whose predicted (color, clarity) is its label."""
    preds, _ = model.predict(kit.crops)
    m = model.manifest
    got = [(m.color_classes[int(np.argmax(p.p_color))], m.clarity_classes[int(np.argmax(p.p_clarity))]) for p in preds]
    return sum(g == want for g, want in zip(got, kit.labels, strict=True)) / len(kit.labels)


def kit_geometry_problem(model: Model, kit: RecordedKit) -> str:
    """Why `kit`'s crops cannot be fed to `model` ('' = they can)."""
    m = model.manifest
    if tuple(kit.crops.shape[1:3]) != tuple(m.size):
        return (f"the kit was recorded at {kit.crops.shape[1]}x{kit.crops.shape[2]} px, the release takes "
                f"{m.size[0]}x{m.size[1]}: record the kit again with this release (sorterd calibrate)")
    if kit.crop_mm is not None and abs(kit.crop_mm - m.crop_mm) > 1e-6:
        return (f"the kit was cut at {kit.crop_mm} mm, the release takes {m.crop_mm} mm crops: record the kit "
                "again with this release (sorterd calibrate)")
    return ""


def qa_problems(model: Model, bundle: Path, kit: RecordedKit | None, decision: DecisionConfig | None,
                min_agreement: float = 0.90, atol: float = GOLDEN_ATOL["fp32"],
                require_kit: bool = True) -> list[tuple[str, str]]:
    """The gate's failures as (check, detail); a missing kit is a failure (the gate cannot be
    shown) unless `require_kit` is False (then only golden runs)."""
    problems = [("golden", p) for p in check_golden(model, bundle, atol, decision)]
    if kit is None:
        if require_kit:
            problems.append(("reference-kit", "no recorded reference kit: record it with the calibration's "
                             "reference-stone step (sorterd calibrate) before a release may go live, or set "
                             "[models] require_kit = false"))
        return problems
    geometry = kit_geometry_problem(model, kit)
    if geometry:
        problems.append(("reference-kit", geometry))
        return problems
    rate = kit_agreement(model, kit)
    if rate < min_agreement:
        problems.append(("reference-kit", f"{rate:.0%} of {len(kit.labels)} reference stones agree with their "
                         f"labels (< {min_agreement:.0%}, §8.4)"))
    return problems
