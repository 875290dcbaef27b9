"""Dual-head inference with onnxruntime.

`OnnxModel` runs a model bundle (`sorterd.data.bundle`: the format, the
manifest and its checks live there) and applies the manifest's pre- and
post-processing -- never constants of its own -- so the sorter and the
trainer cannot disagree about preprocessing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.configfile import opt
from sorterd.data.bundle import Manifest, ModelError, read_manifest, sha256_file
from sorterd.parts.inference import InferenceOptions, Prediction
from sorterd.parts.inference.preprocess import Preprocess
from sorterd.parts.registry import Backend


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
        self.session = _open_session(ort, onnx_path, opts, chosen)
        _check_names(self.session, self.manifest, onnx_path)
        m = self.manifest
        self._outputs = [m.color_output, m.clarity_output]
        if m.ood is not None:
            self._outputs.append(m.ood.output)
        self._pre = Preprocess(m)  # shared with every backend: one copy of the manifest's preprocessing
        self.providers = tuple(self.session.get_providers())

    @property
    def backend(self) -> str:
        """What runs the model: onnxruntime and the provider it got (CPU unless CUDA was asked for and is there)."""
        return f"onnxruntime:{self.providers[0]}" if self.providers else "onnxruntime"

    @property
    def version(self) -> str:
        return self.manifest.version

    def preprocess(self, crops_hwc: np.ndarray) -> np.ndarray:
        """(N, H, W, 6) uint8 -> (N, 6, H, W) float32 per the manifest (`Preprocess.crops`)."""
        return self._pre.crops(crops_hwc)

    def preprocess_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """[(backlit BGR, toplit BGR), ...] -> (N, 6, H, W) float32 (`Preprocess.halves`)."""
        return self._pre.halves(halves)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare model call: preprocessed batch in, logits out."""
        color, clarity, _ = self.run_all(x)
        return color, clarity

    def run_all(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The bare model call: logits and, if the bundle has the gate, the OOD scores."""
        if self.session is None:
            raise ModelError(f"{self.bundle}: the model was closed (a swap replaced it)")
        out = self.session.run(self._outputs, {self.manifest.input_name: x})
        return out[0], out[1], (out[2] if len(out) > 2 else None)

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        """Probabilities for a batch of 6-channel RGB crops, and the bare model call's seconds."""
        return self._classify(self.preprocess(crops_hwc))

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        """Probabilities for (backlit, toplit) BGR crop pairs: the pipeline's hot path."""
        return self._classify(self.preprocess_halves(halves))

    def close(self) -> None:
        """Drop the session (onnxruntime frees it with its last reference); idempotent."""
        self.session = None

    def _classify(self, x: np.ndarray) -> tuple[list[Prediction], float]:
        t0 = time.perf_counter()
        color, clarity, ood = self.run_all(x)
        model_s = time.perf_counter() - t0
        return self._pre.predictions(color, clarity, ood), model_s


def _load_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """What onnxruntime raises for a file it cannot load: its own exception types (each a
    plain Exception subclass, not RuntimeError), looked up by name so that a version
    lacking one still works; plus RuntimeError/ValueError from its Python wrapper."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("InvalidProtobuf", "InvalidGraph", "Fail", "RuntimeException", "NoSuchFile", "NoModel",
             "InvalidArgument", "NotImplemented")
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (*found, RuntimeError, ValueError)


def _open_session(ort: Any, onnx_path: Path, opts: Any, providers: list[str]) -> Any:
    """An InferenceSession, or a one-line ModelError naming the file and what onnxruntime said."""
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except _load_errors(ort) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"{onnx_path}: onnxruntime cannot load it ({type(exc).__name__}: {said}); "
                         "the file is damaged or not an ONNX model -- copy the bundle again") from None


def _check_names(session: Any, manifest: Manifest, onnx_path: Path) -> None:
    """The manifest's input and head names must be the graph's, or the first stone would fail in a worker."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if manifest.input_name not in inputs:
        raise ModelError(f"{onnx_path}: has no input {manifest.input_name!r} (the manifest's input.name); "
                         f"its inputs are {inputs}")
    wanted = [manifest.color_output, manifest.clarity_output] + ([manifest.ood.output] if manifest.ood else [])
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise ModelError(f"{onnx_path}: has no output {', '.join(map(repr, missing))} (the manifest's outputs); "
                         f"its outputs are {outputs}")


@dataclass(frozen=True)
class OnnxInferenceConfig(InferenceOptions):
    type: str = opt("onnxruntime", "Backend: onnxruntime (CPU, or CUDA if available).", choices=("onnxruntime",))
    threads: int = opt(1, "onnxruntime intra-op threads per session.", minval=1, maxval=64)
    providers: tuple[str, ...] = opt(("CPUExecutionProvider",), "onnxruntime execution providers, in order.")


# Opened by the run itself (`sorterd/cli/run.py`), not by the composition root's open_parts.
BACKEND = Backend("inference", "onnxruntime", OnnxInferenceConfig)
