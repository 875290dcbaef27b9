"""Write a model bundle: ``model.onnx`` + ``manifest.json`` (DESIGN §4).

Manifest schema ``sorterd-model/1``::

    {"format": "sorterd-model/1", "version": "v001", "created": "<ISO-8601 UTC>",
     "classes": {"color": ["blue","light","inky"],
                 "clarity": ["transparent","translucent","opaque"]},
     "input": {"name": "input", "size": [128,128], "layout": "NCHW", "dtype": "float32",
               "channel_order": ["backlit_R","backlit_G","backlit_B",
                                 "toplit_R","toplit_G","toplit_B"],
               "scale": 0.00392156862745098, "mean": [6 floats], "std": [6 floats],
               "crop_mm": 6.4},
     "outputs": {"color": "color_logits", "clarity": "clarity_logits", "kind": "logits"},
     "temperature": {"color": 1.0, "clarity": 1.0},
     "onnx_sha256": "<hex sha256 of model.onnx>",
     "metrics": {...}, "training": {...}}

Meaning: input tensor = ((pixel_uint8 * scale) - mean) / std per channel, in
channel_order; probabilities = softmax(logits / temperature[head]).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "sorterd-model/1"
INPUT_NAME = "input"
OUTPUT_NAMES = ("color_logits", "clarity_logits")
INPUT_SIZE = 128
OPSET = 17
COLOR_CLASSES = ("blue", "light", "inky")
CLARITY_CLASSES = ("transparent", "translucent", "opaque")
CHANNEL_ORDER = ("backlit_R", "backlit_G", "backlit_B", "toplit_R", "toplit_G", "toplit_B")
PIXEL_SCALE = 1.0 / 255.0
VERIFY_TOLERANCE = 1e-4
HEADS = ("color", "clarity")


class ExportError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model."""


def export_bundle(
    model: nn.Module,
    out_dir: Path,
    *,
    version: str,
    mean: Sequence[float],
    std: Sequence[float],
    crop_mm: float,
    temperatures: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` to ``out_dir/model.onnx``, verify it, write the manifest; return out_dir.

    The model itself is not modified (a CPU copy in eval mode is exported).
    Raises ValueError for bad arguments and ExportError if onnxruntime's
    outputs differ from torch's by more than 1e-4.
    """
    _check_args(version, mean, std, crop_mm)
    temps = _temperatures(temperatures)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).cpu().eval()
    onnx_path = out_dir / "model.onnx"
    _export_onnx(net, onnx_path)
    verify_onnx(net, onnx_path)
    manifest = build_manifest(
        version=version, mean=mean, std=std, crop_mm=crop_mm, temperatures=temps,
        onnx_sha256=sha256_file(onnx_path), metrics=metrics, training=training,
    )
    write_json_atomic(out_dir / "manifest.json", manifest)
    return out_dir


def _check_args(version: str, mean: Sequence[float], std: Sequence[float], crop_mm: float) -> None:
    if not isinstance(version, str) or not version or any(c in version for c in "/\\ "):
        raise ValueError(f"version={version!r}: must be a non-empty name like 'v001'")
    if len(mean) != len(CHANNEL_ORDER) or len(std) != len(CHANNEL_ORDER):
        raise ValueError(f"mean/std: need {len(CHANNEL_ORDER)} values each, "
                         f"got {len(mean)} and {len(std)}")
    if not all(np.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        raise ValueError(f"mean={list(mean)!r}, std={list(std)!r}: must be finite, std > 0")
    if not 0 < crop_mm < 1000:
        raise ValueError(f"crop_mm={crop_mm!r}: must be a length in mm, 0 < crop_mm < 1000")


def _temperatures(temperatures: Mapping[str, float] | None) -> dict[str, float]:
    temps = {head: 1.0 for head in HEADS}
    for head, value in (temperatures or {}).items():
        if head not in temps:
            raise ValueError(f"temperatures: bad key {head!r}: valid keys are {list(HEADS)}")
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"temperatures.{head}={value!r}: must be a number > 0")
        temps[head] = float(value)
    return temps


def _example_input(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, len(CHANNEL_ORDER), INPUT_SIZE, INPUT_SIZE, generator=gen)


def _export_onnx(net: nn.Module, path: Path) -> None:
    """TorchScript-based exporter, opset 17, dynamic batch axis."""
    tmp = path.with_name(path.name + ".tmp")
    axes = {INPUT_NAME: {0: "batch"}} | {name: {0: "batch"} for name in OUTPUT_NAMES}
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (stable, TensorRT-friendly graphs); torch >= 2.9
        # warns about it on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            net, (_example_input(2),), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes, do_constant_folding=True,
        )
    os.replace(tmp, path)


def verify_onnx(net: nn.Module, path: Path, batch: int = 4) -> float:
    """Max |onnxruntime - torch| over a random batch; raises ExportError above 1e-4."""
    import onnxruntime as ort  # trainer-side dependency; imported only when exporting

    x = _example_input(batch, seed=1)
    with torch.no_grad():
        expected = [t.numpy() for t in net(x)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    worst = max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected, strict=True))
    if not worst <= VERIFY_TOLERANCE:
        raise ExportError(f"{path}: onnxruntime differs from torch by {worst:.3g} "
                          f"(allowed {VERIFY_TOLERANCE})")
    return worst


def build_manifest(
    *,
    version: str,
    mean: Sequence[float],
    std: Sequence[float],
    crop_mm: float,
    temperatures: Mapping[str, float],
    onnx_sha256: str,
    metrics: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest dict (schema in the module docstring)."""
    return {
        "format": FORMAT,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "classes": {"color": list(COLOR_CLASSES), "clarity": list(CLARITY_CLASSES)},
        "input": {
            "name": INPUT_NAME,
            "size": [INPUT_SIZE, INPUT_SIZE],
            "layout": "NCHW",
            "dtype": "float32",
            "channel_order": list(CHANNEL_ORDER),
            "scale": PIXEL_SCALE,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "crop_mm": float(crop_mm),
        },
        "outputs": {"color": OUTPUT_NAMES[0], "clarity": OUTPUT_NAMES[1], "kind": "logits"},
        "temperature": {head: float(temperatures[head]) for head in HEADS},
        "onnx_sha256": onnx_sha256,
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temp file in the same directory, fsync, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; readers may be another user
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
