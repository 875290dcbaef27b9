"""Helpers for the signed-release tests: a key pair, a signed release of models/default, re-signing."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd.data.bundle import MANIFEST_FORMAT, read_golden, read_manifest, resolve_bundle, softmax
from sorterd.data.files import write_json_atomic
from sorterd.release import crash, prepare
from sorterd.release.qa import RecordedKit
from sorterd.release.sign import MANIFEST, release_files, sign_in_place, sign_release

DEFAULT = resolve_bundle("default", None)


def make_release(out: Path, key: Ed25519PrivateKey, release: int, src: Path = DEFAULT) -> Path:
    return sign_release(src, out, key, release, "test-trainer")


def resign(bundle: Path, key: Ed25519PrivateKey, change: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Recompute the file list (and onnx_sha256), apply `change` to the manifest, sign again: a
    release that passes the signature and file checks whatever was done to its files."""
    from sorterd.data.bundle import sha256_file

    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    manifest["files"] = release_files(bundle)
    manifest["onnx_sha256"] = sha256_file(bundle / "model.onnx")
    if change is not None:
        change(manifest)
    write_json_atomic(bundle / MANIFEST, manifest)
    sign_in_place(bundle, key)


def copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def faithful_kit(bundle: Path = DEFAULT) -> RecordedKit:
    """A kit whose labels are what the bundle's own golden outputs say: the right model agrees 100 %."""
    m = read_manifest(bundle)
    golden = read_golden(bundle, m)
    assert golden is not None
    crops, logits = golden
    pc, pk = softmax(logits[:, :3]), softmax(logits[:, 3:])
    labels = [(m.color_classes[int(a)], m.clarity_classes[int(b)]) for a, b in zip(pc.argmax(1), pk.argmax(1), strict=True)]
    return RecordedKit(np.ascontiguousarray(crops), labels)


def swap_clarity_outputs(onnx_path: Path) -> None:
    """The deliberately bad model: the clarity head's first two logits swapped in the graph (a
    Gather on the last axis after the head), so it still loads, matches the manifest's names and
    shapes, and sorts transparent stones as translucent and back."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    name = "clarity_logits"
    inner = name + "_unswapped"
    for node in g.node:
        node.output[:] = [inner if o == name else o for o in node.output]
    idx = helper.make_tensor("swap_idx", onnx.TensorProto.INT64, [3], [1, 0, 2])
    g.initializer.append(idx)
    g.node.append(helper.make_node("Gather", [inner, "swap_idx"], [name], axis=1))
    onnx.save(model, str(onnx_path))


def rename_output(onnx_path: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for out in model.graph.output:
        if out.name == old:
            out.name = new
    onnx.save(model, str(onnx_path))


def helper_dies_at(monkeypatch: pytest.MonkeyPatch, step: str, stuck: Path | None = None) -> None:
    """The helper process (sorterd.release.prepare) run as itself, but killed at crash point `step`
    -- only it, not its parent, as a real crash point would -- or, given `stuck`, stuck there for
    good, having touched that file first."""
    if stuck is None:
        hook = f"import os; os.environ[{crash.ENV!r}] = {step + ':1'!r}; "
    else:
        hook = (f"import time; from pathlib import Path; from sorterd.release import crash; "
                f"crash.point = lambda n: (Path({str(stuck)!r}).touch(), time.sleep(600)) if n == {step!r} else None; ")
    code = f"import runpy; {hook}runpy.run_module({prepare.MODULE!r}, run_name='__main__', alter_sys=True)"
    monkeypatch.setattr(prepare, "child_command", lambda: [sys.executable, "-c", code])
