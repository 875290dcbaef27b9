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
     "golden": {"inputs": {"file": "golden_inputs.npy", "sha256": "<hex>", "shape": [N,128,128,6]},
                "outputs": {"file": "golden_outputs.npy", "sha256": "<hex>", "shape": [N,6]},
                "made_by": "onnxruntime 1.x CPUExecutionProvider"},       (optional)
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

Golden inputs and outputs (optional, written on export): ``golden_inputs.npy`` is
(N, H, W, 6) uint8 crops in channel_order -- raw pixels, so a check covers the
preprocessing too -- and ``golden_outputs.npy`` (N, 6) float32 the logits the export's
onnxruntime gave for them (color's 3 then clarity's 3).  Any backend (a TensorRT
engine, a release under QA) must reproduce them: `sorterd.parts.inference.golden`.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    return parse_manifest(raw, path)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """A manifest from its parsed JSON (a signed release's verified bytes); `path` names it in errors."""
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: a manifest is a JSON object, got {type(raw).__name__}")
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


MODELS_ENV = "SORTERD_MODELS"


def default_bundle() -> Path:
    """Where `[inference] model = "default"` is, searched in this order (README "Models"):

    1. ``$SORTERD_MODELS/default`` when SORTERD_MODELS is set (a site's models directory; set
       but without a bundle, the load fails naming that path -- never a silent fallback),
    2. the checkout's ``models/default`` (a clone, or ``pip install -e .``),
    3. the copy bundled in the installed package (``sorterd/_bundled/models/default``: a
       wheel or ``pip install .``, see setup.py).
    """
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser() / "default"
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "models" / "default").is_dir():
        return checkout / "models" / "default"
    return package / "_bundled" / "models" / "default"


def resolve_bundle(name: str, base: Path | None) -> Path:
    """'default' -> default_bundle(); otherwise a path (relative to base, if given: the config's directory)."""
    if name == "default":
        return default_bundle()
    p = Path(name).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


GOLDEN_FILES = {"inputs": "golden_inputs.npy", "outputs": "golden_outputs.npy"}


def golden_entry(bundle: Path, made_by: str) -> dict[str, Any]:
    """The manifest's "golden" entry for the golden files already written in the bundle."""
    entry: dict[str, Any] = {"made_by": made_by}
    for role, name in GOLDEN_FILES.items():
        arr = np.load(bundle / name, allow_pickle=False)
        entry[role] = {"file": name, "sha256": sha256_file(bundle / name), "shape": list(arr.shape)}
    return entry


def read_golden(bundle: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """(crops uint8 (N,H,W,6), logits float32 (N,6)) from the bundle, each file checked against
    the manifest's sha256 and shape; None when the bundle carries none; ModelError when damaged."""
    entry = manifest.raw.get("golden")
    if entry is None:
        return None
    arrays = []
    for role in GOLDEN_FILES:
        spec = entry.get(role) if isinstance(entry, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str) or "/" in spec["file"]:
            raise ModelError(f"{bundle / 'manifest.json'}: golden.{role} must name a file in the bundle "
                             "with its sha256 and shape")
        path = bundle / spec["file"]
        if not path.exists():
            raise ModelError(f"{path}: missing (the manifest's golden.{role})")
        digest = sha256_file(path)
        if digest != spec.get("sha256"):
            raise ModelError(f"{path}: sha256 {digest[:12]}… does not match the manifest's golden.{role}.sha256")
        arrays.append(np.load(path, allow_pickle=False))
    crops, logits = arrays
    n, (h, w) = len(crops), manifest.size
    if crops.dtype != np.uint8 or crops.shape[1:] != (h, w, 6) or logits.shape != (n, 6):
        raise ModelError(f"{bundle}: golden inputs {crops.shape} {crops.dtype} / outputs {logits.shape}: "
                         f"expected (N, {h}, {w}, 6) uint8 and (N, 6)")
    return crops, logits.astype(np.float32)
