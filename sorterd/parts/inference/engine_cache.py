"""The TensorRT engine cache: one serialized engine per key, beside the bundle (DESIGN §4).

An engine is only valid for the exact ONNX, TensorRT version, GPU (name and compute
capability), precision and input shape/profile it was built for, so all of them form the
key, and the file name shows it (jetson-inference's `model.onnx.1.1.8201.GPU.FP16.engine`
is the model)::

    <cache>/model.onnx.<sha256[:16]>.trt<10.3.0>.<gpu-slug>.sm<87>.<fp16>.b<1-4-16>.<6x128x128>.engine
    <cache>/....engine.json      sidecar: {"key": {every field in full}, "length": n, "sha256": hex}

A cached file is loaded only if its sidecar's key equals the wanted key field by field (the
name's short hash could collide) and its length and sha256 match (a truncated or damaged file
is rebuilt, never handed to TensorRT).  The engine is written first, then the sidecar, each
fsynced and renamed into place: a crash in between leaves an engine without a sidecar, which
is rebuilt.  Default place: `<bundle>.engines/` beside the bundle directory (not inside it: a
release's files are exactly its manifest's).  Clearing it is always safe: `rm -r` it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sorterd.data.files import write_bytes_atomic, write_json_atomic


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str  # "fp16" | "fp32" (what was built, not "auto")
    profile: tuple[int, int, int]  # min, opt, max batch
    input_chw: tuple[int, int, int]

    def file_name(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        cc = self.compute_capability.replace(".", "")
        b = "-".join(map(str, self.profile))
        chw = "x".join(map(str, self.input_chw))
        return (f"model.onnx.{self.onnx_sha256[:16]}.trt{self.tensorrt_version}.{gpu}.sm{cc}."
                f"{self.precision}.b{b}.{chw}.engine")

    def as_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def default_cache_dir(bundle: Path) -> Path:
    """`<bundle>.engines` beside the bundle directory."""
    bundle = bundle.resolve()
    return bundle.with_name(bundle.name + ".engines")


def load(cache_dir: Path, key: EngineKey) -> tuple[bytes | None, str]:
    """(the cached engine for `key`, "") or (None, why it is not usable: 'none cached', 'key differs', ...)."""
    path = cache_dir / key.file_name()
    side = path.with_name(path.name + ".json")
    if not path.exists():
        return None, f"no cached engine {path.name}"
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{side.name}: unreadable sidecar ({type(exc).__name__}); the engine is rebuilt"
    if not isinstance(meta, dict) or meta.get("key") != key.as_json():
        return None, f"{path.name}: cached for another key {meta.get('key') if isinstance(meta, dict) else meta!r}"
    data = path.read_bytes()
    if len(data) != meta.get("length"):
        return None, f"{path.name}: {len(data)} bytes, the sidecar says {meta.get('length')} (truncated); rebuilt"
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None, f"{path.name}: sha256 differs from its sidecar (damaged); rebuilt"
    return data, ""


def store(cache_dir: Path, key: EngineKey, data: bytes) -> Path:
    """Write the engine, then its sidecar, each durably and atomically; returns the engine's path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / key.file_name()
    write_bytes_atomic(path, data)
    write_json_atomic(path.with_name(path.name + ".json"),
                      {"key": key.as_json(), "length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return path
