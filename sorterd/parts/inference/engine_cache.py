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
is rebuilt (a sidecar never describes bytes not yet in place; an old sidecar left beside a newer
engine of the same name fails the length/sha256 check).  A crash while a file is being written
leaves its temporary file (`.<name>.*.tmp`, never loaded: another name); `clean` removes those
before the cache is used (the backend calls it first, `TensorRTModel._load_or_build`).  Writers
and `clean` hold `.lock` (flock, released by the kernel on any death), so a second writer -- the
CLI's `sorterd models build-engine` beside a running daemon -- never has its temporary file
removed under it.  The crash points (`sorterd.release.crash`): `engine.writing` (the engine's
temporary file whole, not renamed), `engine.written` (renamed, no sidecar yet).  Default place: `<bundle>.engines/` beside the bundle directory (not inside it: a
release's files are exactly its manifest's).  Clearing it is always safe: `rm -r` it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sorterd.data.files import fsync_dir, write_bytes_atomic, write_json_atomic
from sorterd.release import crash

LOCK = ".lock"


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


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """The cache directory's writer lock (blocking: a writer holds it for one file pair's write, not a build)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def clean(cache_dir: Path) -> list[str]:
    """Remove the temporary files a crash left mid-write (`.<name>.*.tmp`: a cut engine or sidecar,
    never loaded but as large as an engine); the names removed.  Nothing when the folder is absent."""
    if not cache_dir.is_dir():
        return []
    with _locked(cache_dir):  # no writer is between its temporary file and its rename now
        left = sorted(p.name for p in cache_dir.glob(".*.tmp"))
        for name in left:
            (cache_dir / name).unlink(missing_ok=True)
    return left


def store(cache_dir: Path, key: EngineKey, data: bytes) -> Path:
    """Write the engine, then its sidecar, each durably and atomically; returns the engine's path."""
    with _locked(cache_dir):
        path = cache_dir / key.file_name()
        write_bytes_atomic(path, data, before_rename=lambda: crash.point("engine.writing"))
        crash.point("engine.written")
        write_json_atomic(path.with_name(path.name + ".json"),
                          {"key": key.as_json(), "length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        fsync_dir(cache_dir)  # both names durable before the engine is used (a cut may keep the pair or not, never torn)
    return path
