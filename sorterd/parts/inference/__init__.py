"""Inference: the model that classifies each stone's crops.

Backends (`[inference] type`): `onnxruntime` (CPU, or CUDA if available).  The
daemon's run opens the model from these options (`sorterd/cli/run.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sorterd.configfile import opt


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
