"""Write a model bundle: ``model.onnx`` + ``manifest.json`` (DESIGN §4), the torch side.

The format -- manifest schema, channel and class order, input names -- is
`sorterd.data.bundle`'s; this module exports the network to ONNX, checks
onnxruntime reproduces torch, and writes the manifest that module builds.
Given crops, it also writes the bundle's golden inputs and outputs (`write_golden`:
onnxruntime's logits on them) that every backend and the release QA check against.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sorterd.data.bundle import (
    CHANNEL_ORDER,
    GOLDEN_FILES,
    HEADS,
    INPUT_NAME,
    INPUT_SIZE,
    OOD_OUTPUT,
    OUTPUT_NAMES,
    ModelError,
    build_manifest,
    golden_entry,
    sha256_file,
)
from sorterd.data.files import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from sorterd.train.ood import OodFit

OPSET = 17
# onnxruntime vs torch, relative to the logits' own scale: float32 sums over a 128 x 128 crop
# in another order differ by ~1e-6 of their size, and a random-normal probe input drives the
# logits of a trained model to 20-50 (a fine-tuned one, after BN recalibration on few stones,
# to thousands), where an absolute 1e-4 is rounding, not a broken export.
VERIFY_TOLERANCE = 1e-4


class ExportError(ModelError):
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
    golden_crops: np.ndarray | None = None,
    ood: OodFit | None = None,
) -> Path:
    """Export ``model`` to ``out_dir/model.onnx``, verify it, write the manifest; return out_dir.

    The model itself is not modified (a CPU copy in eval mode is exported).  With ``ood``
    the graph has a third output, ``ood_score`` (`sorterd.train.ood`), and the manifest
    an ``ood`` section saying so.
    Raises ValueError for bad arguments and ExportError if onnxruntime's
    outputs differ from torch's by more than 1e-4.
    """
    _check_args(version, mean, std, crop_mm)
    temps = _temperatures(temperatures)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).cpu().eval()
    names = list(OUTPUT_NAMES)
    if ood is not None:
        from sorterd.train.mobilenet import MobileNetV3Small
        from sorterd.train.ood import WithOod

        if not isinstance(net, MobileNetV3Small):
            raise ValueError(f"ood: the gate needs the trainer's MobileNetV3Small, not {type(net).__name__}")
        net = WithOod(net, ood).eval()
        names.append(OOD_OUTPUT)
    onnx_path = out_dir / "model.onnx"
    _export_onnx(net, onnx_path, names)
    verify_onnx(net, onnx_path, names=names)
    manifest = build_manifest(
        version=version, mean=mean, std=std, crop_mm=crop_mm, temperatures=temps,
        onnx_sha256=sha256_file(onnx_path), metrics=metrics, training=training,
    )
    if ood is not None:
        manifest["ood"] = ood.manifest()
    write_json_atomic(out_dir / "manifest.json", manifest)
    if golden_crops is not None:
        write_golden(out_dir, golden_crops)
    return out_dir


GOLDEN_ROWS = 32


def write_golden(bundle: Path, crops: np.ndarray, rows: int = GOLDEN_ROWS) -> int:
    """Golden inputs/outputs for a written bundle: onnxruntime's logits on up to `rows` of
    `crops` ((N, H, W, 6) uint8, channel order) whose class and bin are stable
    (`golden.stable_rows`); both .npy files fsynced and renamed into place, then the manifest
    (its "golden" entry, with sha256s) rewritten atomically.  Returns the rows kept."""
    import onnxruntime as ort  # trainer-side dependency; imported only when exporting

    from sorterd.parts.inference.golden import stable_rows
    from sorterd.parts.inference.onnxruntime import OnnxModel

    bundle = Path(bundle)
    model = OnnxModel(bundle, providers=("CPUExecutionProvider",))
    h, w = model.manifest.size
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (h, w, 6):
        raise ValueError(f"golden crops {crops.shape} {crops.dtype}: expected (N, {h}, {w}, 6) uint8")
    color, clarity = model.run(model.preprocess(crops))
    logits = np.concatenate([color, clarity], axis=1).astype(np.float32)
    keep = stable_rows(logits, model.manifest)[:rows]
    if keep.size == 0:
        raise ValueError(f"golden crops: none of {len(crops)} is far enough from a decision edge; give more crops")
    for name, arr in ((GOLDEN_FILES["inputs"], crops[keep]), (GOLDEN_FILES["outputs"], logits[keep])):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        write_bytes_atomic(bundle / name, buf.getvalue())
    raw = dict(model.manifest.raw)
    raw["golden"] = golden_entry(bundle, f"onnxruntime {ort.__version__} CPUExecutionProvider")
    write_json_atomic(bundle / "manifest.json", raw)
    return int(keep.size)


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


def _export_onnx(net: nn.Module, path: Path, names: Sequence[str] = OUTPUT_NAMES) -> None:
    """TorchScript-based exporter, opset 17, dynamic batch axis."""
    tmp = path.with_name(path.name + ".tmp")
    axes = {INPUT_NAME: {0: "batch"}} | {name: {0: "batch"} for name in names}
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (stable, TensorRT-friendly graphs); torch >= 2.9
        # warns about it on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            net, (_example_input(2),), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(names),
            dynamic_axes=axes, do_constant_folding=True,
        )
    os.replace(tmp, path)


def verify_onnx(net: nn.Module, path: Path, batch: int = 4, names: Sequence[str] = OUTPUT_NAMES) -> float:
    """Max |onnxruntime - torch| over a random batch, relative to max(1, max |logit|) of each
    head (and, for outputs that are not logits -- the OOD score of a random input is in the
    thousands -- to each value's own size); raises ExportError above VERIFY_TOLERANCE."""
    import onnxruntime as ort  # trainer-side dependency; imported only when exporting

    x = _example_input(batch, seed=1)
    with torch.no_grad():
        expected = [t.numpy() for t in net(x)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(names), {INPUT_NAME: x.numpy()})
    worst = max(float((np.abs(np.asarray(g) - e) / (max(1.0, float(np.abs(e).max())) if n in OUTPUT_NAMES
                                                      else np.maximum(1.0, np.abs(e)))).max())
                for n, g, e in zip(names, got, expected, strict=True))
    if not worst <= VERIFY_TOLERANCE:
        raise ExportError(f"{path}: onnxruntime differs from torch by {worst:.3g} of the logits' scale "
                          f"(allowed {VERIFY_TOLERANCE}): the exported graph does not compute the model")
    return worst
