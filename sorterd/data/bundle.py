"""The model bundle: the contract between the trainer that writes it and the sorter that reads it.

A bundle is a directory with ``model.onnx`` and ``manifest.json`` (DESIGN §4).
Everything about the input (size, channel order, scale, mean/std, physical
crop size) and the output (head names, class order, temperatures) is read
from the manifest -- never from constants at the reader -- so the sorter and
the trainer cannot disagree about preprocessing.  This module is the one
place that knows the format; it imports neither torch nor onnxruntime, so the
sorter, the trainer and tools can all use it.

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
     "ood": {"output": "ood_score", "stone_limit": 1.0, "batch_share_limit": 0.1,
             "batch_min_stones": 50, ...},                        (optional)
     "metrics": {...}, "training": {...}}

``ood`` (optional; bundles from v003 on): the graph's third output is a per-stone
out-of-distribution score (`sorterd.train.ood`: distance to the training stones in
the model's feature space and in input statistics, 1.0 = the validation stones'
99.5 % quantile).  A stone over ``stone_limit`` goes to SELECT, flagged, whatever its
softmax says; a batch whose share of such stones, over at least ``batch_min_stones``,
exceeds ``batch_share_limit`` has drifted outside what the model knows.  A bundle
without the section has no gate (the sorter says so once in its log).

Meaning: input tensor = ((pixel_uint8 * scale) - mean) / std per channel, in
channel_order; probabilities = softmax(logits / temperature[head]).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.domain import CLARITIES, COLORS, LIGHT_MODES

MANIFEST_FORMAT = "sorterd-model/1"
# The six input planes: each light mode's frame (in LIGHT_MODES order), RGB.
CHANNEL_ORDER = tuple(f"{mode}_{c}" for mode in LIGHT_MODES for c in "RGB")
HEADS = ("color", "clarity")
CLASS_ORDER = {"color": COLORS, "clarity": CLARITIES}  # each head's outputs, in order
INPUT_NAME = "input"
OUTPUT_NAMES = ("color_logits", "clarity_logits")  # in HEADS order
OOD_OUTPUT = "ood_score"  # the optional third output: the out-of-distribution gate's score
INPUT_SIZE = 128
PIXEL_SCALE = 1.0 / 255.0


class ModelError(ValueError):
    """A model bundle that cannot be used, and why."""


@dataclass(frozen=True)
class Manifest:
    version: str
    color_classes: tuple[str, ...]
    clarity_classes: tuple[str, ...]
    input_name: str
    size: tuple[int, int]
    scale: float
    mean: np.ndarray
    std: np.ndarray
    crop_mm: float
    color_output: str
    clarity_output: str
    temperature: dict[str, float]
    onnx_sha256: str
    raw: dict[str, Any]
    ood: OodSpec | None = None  # None: an older bundle, no out-of-distribution gate


@dataclass(frozen=True)
class OodSpec:
    """The manifest's ``ood`` section: the gate's output and limits."""

    output: str
    stone_limit: float
    batch_share_limit: float
    batch_min_stones: int


def _ood_spec(raw: Any, path: Path) -> OodSpec | None:
    if raw is None:
        return None
    try:
        spec = OodSpec(str(raw["output"]), float(raw["stone_limit"]), float(raw["batch_share_limit"]),
                       int(raw["batch_min_stones"]))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: ood = {raw!r}: needs output (name), stone_limit > 0, "
                         "batch_share_limit in 0..1 and batch_min_stones >= 1") from None
    if not (spec.stone_limit > 0 and 0 <= spec.batch_share_limit <= 1 and spec.batch_min_stones >= 1):
        raise ModelError(f"{path}: ood = {raw!r}: needs stone_limit > 0, batch_share_limit in 0..1 "
                         "and batch_min_stones >= 1")
    return spec


def _need(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise ModelError(f"{path}: manifest lacks {key!r}")
    return d[key]


def read_manifest(bundle: Path) -> Manifest:
    """The bundle's manifest, checked against what sorterd feeds and reads; ModelError says what is wrong."""
    path = bundle / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{bundle}: not a model bundle (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if raw.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    inp, out = _need(raw, "input", path), _need(raw, "outputs", path)
    if list(_need(inp, "channel_order", path)) != list(CHANNEL_ORDER):
        raise ModelError(f"{path}: input.channel_order {inp['channel_order']!r}, "
                         f"sorterd feeds {list(CHANNEL_ORDER)!r}")
    if out.get("kind", "logits") != "logits":
        raise ModelError(f"{path}: outputs.kind {out.get('kind')!r}: only 'logits' is supported")
    classes = _need(raw, "classes", path)
    mean = np.asarray(_need(inp, "mean", path), dtype=np.float32)
    std = np.asarray(_need(inp, "std", path), dtype=np.float32)
    if mean.shape != (6,) or std.shape != (6,) or np.any(std <= 0):
        raise ModelError(f"{path}: input.mean/std must be 6 numbers each, std > 0")
    temps = raw.get("temperature", {})
    return Manifest(
        version=str(_need(raw, "version", path)),
        color_classes=tuple(_need(classes, "color", path)),
        clarity_classes=tuple(_need(classes, "clarity", path)),
        input_name=str(inp.get("name", "input")),
        size=tuple(_need(inp, "size", path)),  # type: ignore[arg-type]
        scale=float(_need(inp, "scale", path)),
        mean=mean,
        std=std,
        crop_mm=float(_need(inp, "crop_mm", path)),
        color_output=str(_need(out, "color", path)),
        clarity_output=str(_need(out, "clarity", path)),
        temperature={"color": float(temps.get("color", 1.0)), "clarity": float(temps.get("clarity", 1.0))},
        onnx_sha256=str(_need(raw, "onnx_sha256", path)),
        raw=raw,
        ood=_ood_spec(raw.get("ood"), path),
    )


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
    """The manifest dict (schema in the module docstring), as the trainer writes it."""
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "classes": {head: list(CLASS_ORDER[head]) for head in HEADS},
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
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (ONNX files are megabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from logits per the manifest: softmax(logits / temperature), in the input's dtype.

    The sorter passes float32 logits; the trainer passes float64 for fitting
    temperatures and calibration figures.  One function, so both compute the same thing.
    """
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def resolve_bundle(name: str, base: Path | None) -> Path:
    """'default' -> the repository's models/default; otherwise a path (relative to base, if given)."""
    if name == "default":
        return Path(__file__).resolve().parents[2] / "models" / "default"
    p = Path(name).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p
