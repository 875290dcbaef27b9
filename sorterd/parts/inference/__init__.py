"""Inference: a model bundle (§4) run on 6-channel crops, dual head out.

Backends (`[inference] type`): `onnxruntime` (CPU/CUDA: `inference/onnxruntime.py`);
`tensorrt` (an engine built on the device and cached, onnxruntime meanwhile:
`inference/tensorrt.py`).  Both use one copy of the manifest's preprocessing
(`inference/preprocess.py`); a bundle's golden inputs check any backend (`inference/golden.py`).  The sorting pipeline, calibration's reference-stone
check and the trainer's evaluation use a model only through `Model`; the
daemon's run opens it from these options (`sorterd/cli/run.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sorterd.configfile import opt

if TYPE_CHECKING:
    from sorterd.data.bundle import Manifest


@dataclass(frozen=True)
class Prediction:
    """One stone's class probabilities, in the manifest's class order (every backend returns these)."""

    p_color: np.ndarray  # (3,)
    p_clarity: np.ndarray  # (3,)
    # The out-of-distribution score (manifest "ood": > its stone_limit = the model does not
    # know this stone); None: the bundle has no gate.
    ood: float | None = None


class Model(Protocol):
    """What the pipeline, calibration and evaluation use of a loaded model bundle."""

    manifest: Manifest  # preprocessing (size, crop_mm, mean/std) and class order, from the bundle

    @property
    def version(self) -> str:
        """The bundle's version (every stone row and the run summary name it)."""
        ...

    @property
    def backend(self) -> str:
        """What runs the model right now, e.g. 'onnxruntime:CPUExecutionProvider', 'tensorrt:fp16'
        (status, metrics and the batch log say it)."""
        ...

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        """Probabilities for (N, H, W, 6) uint8 RGB crops, and the bare model call's seconds."""
        ...

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        """Probabilities for (backlit, toplit) BGR crop pairs (the pipeline's hot path), and the model's seconds."""
        ...

    def close(self) -> None:
        """Release what the model holds (sessions, an engine and its inference thread); called once
        no pair uses it any more (after a swap, at the end of a run).  Idempotent."""
        ...


@dataclass(frozen=True)
class InferenceOptions:
    """What every `[inference]` backend's options declare: the bundle, and what the run and
    the calibration read to open it."""

    type: str = opt("", "Backend.")
    model: str = opt(
        "default",
        "Model bundle directory (model.onnx + manifest.json); 'default' = the bundle "
        "shipped in the repository's models/default.",
    )
    threads: int = opt(1, "Intra-op threads per inference session.", minval=1, maxval=64)
    providers: tuple[str, ...] = opt(("CPUExecutionProvider",), "Execution providers, in order.")
