"""Model bundles and dual-head inference.

A bundle is a directory with `model.onnx` and `manifest.json`.  Everything
about the input (size, channel order, scale, mean/std, physical crop size)
and the output (head names, class order, temperatures) is read from the
manifest -- never from constants here -- so the sorter and the trainer cannot
disagree about preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.configfile import opt
from sorterd.parts.inference import InferenceOptions
from sorterd.parts.registry import Backend

MANIFEST_FORMAT = "sorterd-model/1"
CHANNEL_ORDER = ["backlit_R", "backlit_G", "backlit_B", "toplit_R", "toplit_G", "toplit_B"]


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


def _need(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise ModelError(f"{path}: manifest lacks {key!r}")
    return d[key]


def read_manifest(bundle: Path) -> Manifest:
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
    if list(_need(inp, "channel_order", path)) != CHANNEL_ORDER:
        raise ModelError(f"{path}: input.channel_order {inp['channel_order']!r}, sorterd feeds {CHANNEL_ORDER!r}")
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
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Prediction:
    p_color: np.ndarray  # (3,) in manifest class order
    p_clarity: np.ndarray


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxModel:
    """An onnxruntime session plus the manifest's pre- and post-processing.

    `predict` is called from worker threads; onnxruntime sessions are safe to
    run concurrently and release the GIL.
    """

    def __init__(self, bundle: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.manifest = read_manifest(bundle)
        onnx_path = bundle / "model.onnx"
        if not onnx_path.exists():
            raise ModelError(f"{bundle}: no model.onnx")
        digest = sha256_file(onnx_path)
        if digest != self.manifest.onnx_sha256:
            raise ModelError(f"{onnx_path}: sha256 {digest[:12]}… does not match the manifest's {self.manifest.onnx_sha256[:12]}…")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=chosen)
        m = self.manifest
        self._outputs = [m.color_output, m.clarity_output]
        # Fold scale, mean and std into one multiply-add per channel.
        self._mul = (m.scale / m.std).astype(np.float32).reshape(1, 6, 1, 1)
        self._add = (-m.mean / m.std).astype(np.float32).reshape(1, 6, 1, 1)

    @property
    def version(self) -> str:
        return self.manifest.version

    def preprocess(self, crops_hwc: np.ndarray) -> np.ndarray:
        """(N, H, W, 6) uint8 -> (N, 6, H, W) float32 per the manifest."""
        x = np.ascontiguousarray(crops_hwc.transpose(0, 3, 1, 2), dtype=np.float32)
        x *= self._mul
        x += self._add
        return x

    def preprocess_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """[(backlit BGR, toplit BGR), ...] -> (N, 6, H, W) float32, RGB order per half.

        Same result as `preprocess` on the concatenated RGB crops, ~3x faster:
        each plane is copied once, with no 6-channel intermediate.
        """
        h, w = halves[0][0].shape[:2]
        x = np.empty((len(halves), 6, h, w), dtype=np.float32)
        for i, (back, top) in enumerate(halves):
            for k, img in enumerate((back, top)):
                for c in range(3):
                    x[i, 3 * k + c] = img[:, :, 2 - c]  # BGR -> RGB
        x *= self._mul
        x += self._add
        return x

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare model call: preprocessed batch in, logits out."""
        color, clarity = self.session.run(self._outputs, {self.manifest.input_name: x})
        return color, clarity

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        """Probabilities for a batch of 6-channel RGB crops, and the bare model call's seconds."""
        return self._classify(self.preprocess(crops_hwc))

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        """Probabilities for (backlit, toplit) BGR crop pairs: the pipeline's hot path."""
        return self._classify(self.preprocess_halves(halves))

    def _classify(self, x: np.ndarray) -> tuple[list[Prediction], float]:
        t0 = time.perf_counter()
        color, clarity = self.run(x)
        model_s = time.perf_counter() - t0
        t = self.manifest.temperature
        pc, pk = softmax(color, t["color"]), softmax(clarity, t["clarity"])
        return [Prediction(pc[i], pk[i]) for i in range(len(pc))], model_s


def resolve_bundle(name: str, base: Path | None) -> Path:
    """'default' -> the repository's models/default; otherwise a path."""
    if name == "default":
        return Path(__file__).resolve().parents[3] / "models" / "default"
    p = Path(name).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


@dataclass(frozen=True)
class OnnxInferenceConfig(InferenceOptions):
    type: str = opt("onnxruntime", "Backend: onnxruntime (CPU, or CUDA if available).", choices=("onnxruntime",))
    threads: int = opt(1, "onnxruntime intra-op threads per session.", minval=1, maxval=64)
    providers: tuple[str, ...] = opt(("CPUExecutionProvider",), "onnxruntime execution providers, in order.")


# Opened by the run itself (`sorterd/cli/run.py`), not by the composition root's open_parts.
BACKEND = Backend("inference", "onnxruntime", OnnxInferenceConfig)
