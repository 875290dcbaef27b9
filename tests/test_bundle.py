"""The model-bundle contract (sorterd.data.bundle) and the atomic file writers (sorterd.data.files)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd.data import files
from sorterd.data.bundle import (
    CHANNEL_ORDER,
    MANIFEST_FORMAT,
    ModelError,
    build_manifest,
    read_manifest,
    resolve_bundle,
    sha256_file,
    softmax,
)
from sorterd.data.files import write_json_atomic, write_png_atomic

REPO = Path(__file__).resolve().parent.parent


def _bundle(tmp_path: Path, **changes: Any) -> Path:
    """A bundle directory whose manifest is build_manifest's, with top-level keys changed."""
    manifest = build_manifest(version="v009", mean=[0.5] * 6, std=[0.25] * 6, crop_mm=6.4,
                              temperatures={"color": 1.5, "clarity": 0.8}, onnx_sha256="ab" * 32,
                              metrics=None, training={"epochs": 2})
    manifest.update(changes)
    write_json_atomic(tmp_path / "manifest.json", manifest)
    return tmp_path


# -- the contract ----------------------------------------------------------------------------


def test_what_the_trainer_writes_the_sorter_reads(tmp_path: Path) -> None:
    m = read_manifest(_bundle(tmp_path))
    assert (m.version, m.color_classes, m.clarity_classes) == (
        "v009", ("blue", "light", "inky"), ("transparent", "translucent", "opaque"))
    assert (m.input_name, m.size, m.scale, m.crop_mm) == ("input", (128, 128), 1 / 255, 6.4)
    assert (m.color_output, m.clarity_output) == ("color_logits", "clarity_logits")
    assert m.temperature == {"color": 1.5, "clarity": 0.8}
    assert m.mean.tolist() == [0.5] * 6 and m.std.tolist() == [0.25] * 6
    assert m.raw["input"]["channel_order"] == list(CHANNEL_ORDER)
    assert m.raw["format"] == MANIFEST_FORMAT and m.raw["training"] == {"epochs": 2}


def test_channel_order_is_backlit_rgb_then_toplit_rgb() -> None:
    assert CHANNEL_ORDER == ("backlit_R", "backlit_G", "backlit_B", "toplit_R", "toplit_G", "toplit_B")


def test_the_shipped_bundle_reads_and_matches_its_onnx() -> None:
    bundle = resolve_bundle("default", None)
    assert bundle == REPO / "models" / "default"
    assert sha256_file(bundle / "model.onnx") == read_manifest(bundle).onnx_sha256


def test_relative_bundle_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    assert resolve_bundle("models/v3", tmp_path) == tmp_path / "models" / "v3"
    assert resolve_bundle("/abs/v3", tmp_path) == Path("/abs/v3")
    assert resolve_bundle("models/v3", None) == Path("models/v3")


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "sorterd-model/0"}, "format 'sorterd-model/0', expected 'sorterd-model/1'"),
    ({"outputs": {"color": "c", "clarity": "k", "kind": "probabilities"}},
     "outputs.kind 'probabilities': only 'logits' is supported"),
    ({"classes": {"color": ["blue", "light", "inky"]}}, "manifest lacks 'clarity'"),
])
def test_a_bad_manifest_says_what_is_wrong(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'manifest.json'}: {message}")):
        read_manifest(_bundle(tmp_path, **changes))


def test_a_foreign_channel_order_is_refused_naming_both(tmp_path: Path) -> None:
    raw = json.loads((_bundle(tmp_path) / "manifest.json").read_text())
    raw["input"]["channel_order"] = ["toplit_R", "toplit_G", "toplit_B", "backlit_R", "backlit_G", "backlit_B"]
    write_json_atomic(tmp_path / "manifest.json", raw)
    with pytest.raises(ModelError, match=re.escape(
            "input.channel_order ['toplit_R', 'toplit_G', 'toplit_B', 'backlit_R', 'backlit_G', 'backlit_B'], "
            "sorterd feeds ['backlit_R', 'backlit_G', 'backlit_B', 'toplit_R', 'toplit_G', 'toplit_B']")):
        read_manifest(tmp_path)


def test_a_directory_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path}: not a model bundle (no manifest.json)")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ModelError, match=r"manifest.json: not valid JSON \("):
        read_manifest(tmp_path)


def test_softmax_keeps_the_dtype_and_applies_the_temperature() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [1000.0, 1000.0, 0.0]], dtype=np.float32)
    p = softmax(logits)
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[1], [0.5, 0.5, 0.0])  # no overflow at large logits
    hot = softmax(logits.astype(np.float64), temperature=2.0)
    assert hot.dtype == np.float64
    assert np.allclose(hot[0], softmax(logits[:1].astype(np.float64) / 2.0)[0])
    assert hot[0, 0] < p[0, 0]  # a higher temperature is less confident


def test_the_contract_needs_neither_torch_nor_onnxruntime() -> None:
    code = ("import sys\n"
            "sys.modules['torch'] = None; sys.modules['onnxruntime'] = None  # importing them now fails\n"
            "import sorterd.data.bundle, sorterd.data.files\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr


# -- atomic files ----------------------------------------------------------------------------


def test_json_is_written_whole_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    old = os.umask(0o077)  # a strict umask must not hide the file from another user
    try:
        write_json_atomic(path, {"a": [1, 2.5], "b": "x"})
    finally:
        os.umask(old)
    assert path.read_text() == '{\n  "a": [\n    1,\n    2.5\n  ],\n  "b": "x"\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomic(path, {"v": float("nan")})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]


def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"v": 1})

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # stands for the process dying between write and rename

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_png_is_lossless_and_0644(tmp_path: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "S000001.png"
    write_png_atomic(path, image)
    back = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert back is not None and np.array_equal(back, image)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["S000001.png"]


def test_an_image_that_cannot_be_encoded_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(cv2.error):
        write_png_atomic(tmp_path / "bad.png", np.zeros((0, 0, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_sorterd_models_names_the_default_bundle_and_never_falls_back(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORTERD_MODELS", str(tmp_path))
    assert resolve_bundle("default", None) == tmp_path / "default"  # absent: the load fails naming it
    assert resolve_bundle("models/v3", tmp_path) == tmp_path / "models" / "v3"  # paths are not searched
    monkeypatch.delenv("SORTERD_MODELS")
    assert resolve_bundle("default", None) == REPO / "models" / "default"  # a checkout: its models/
