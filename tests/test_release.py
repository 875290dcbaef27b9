"""Signed releases: every refusal of issue 12 names its check and leaves nothing accepted or
loaded; a good release is accepted, the floor survives a restart, activate/rollback/pin."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd.config import DecisionConfig
from sorterd.link.keys import KeyFileError
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.release import keys as release_keys
from sorterd.release.qa import RecordedKit, qa_problems
from sorterd.release.store import ReleaseStore, StoreError
from sorterd.release.verify import CHECKS, QA_CHECKS, Refused, ReleaseFloor, Verified, verify_release
from tests.release_fakes import copy_release, faithful_kit, make_release, rename_output, resign

MAX = 50_000_000


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> Path:
    return make_release(tmp_path_factory.mktemp("rel") / "r5", key, 5)


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ReleaseStore:
    return ReleaseStore(tmp_path / "state", [key.public_key()], MAX)


def kit_gate(kit: RecordedKit) -> object:
    def gate(v: Verified) -> list[tuple[str, str]]:
        return qa_problems(OnnxModel(v.path), v.path, kit, DecisionConfig())
    return gate


def refused(store: ReleaseStore, bundle: Path, qa: object = None) -> Refused:
    before, stored = store.state(), store.releases()
    with pytest.raises(Refused) as info:
        store.stage(bundle, qa)  # type: ignore[arg-type]
    # Nothing accepted, nothing left in staging, the floor unchanged.
    assert store.releases() == stored
    assert list((store.root / "staging").iterdir()) == []
    assert store.state() == before
    assert info.value.check in CHECKS + QA_CHECKS
    assert str(info.value).startswith(info.value.check + ": ")
    return info.value


def test_a_signed_release_is_accepted_and_the_floor_persists(store: ReleaseStore, signed: Path,
                                                             key: Ed25519PrivateKey) -> None:
    v = store.stage(signed, kit_gate(faithful_kit()))  # type: ignore[arg-type]
    assert (v.release, v.trainer) == (5, "test-trainer")
    assert store.releases() == [5] and not (v.path / "weights.pt").exists()
    again = ReleaseStore(store.root, [key.public_key()], MAX)  # a restart
    assert again.floor() == ReleaseFloor(5, None)
    assert refused(again, signed).check == "downgrade"  # the same release again is not "newer"


def test_unsigned(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    (b / "manifest.sig").unlink()
    assert refused(store, b).check == "unsigned"


def test_untrusted_key(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    resign(b, Ed25519PrivateKey.generate())
    e = refused(store, b)
    assert e.check == "untrusted-key" and "not among the 1 trusted" in str(e)


def test_tampered_onnx(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    e = refused(store, b)
    assert e.check == "file-hash" and "model.onnx" in str(e)


def test_tampered_manifest(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["release"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    assert refused(store, b).check == "signature"


def test_extra_file(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    (b / "payload.bin").write_bytes(b"x")
    e = refused(store, b)
    assert e.check == "unlisted-file" and "payload.bin" in str(e)


def test_missing_file(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    (b / "golden_outputs.npy").unlink()
    assert refused(store, b).check == "missing-file"


def test_symlink(store: ReleaseStore, signed: Path, tmp_path: Path) -> None:
    b = copy_release(signed, tmp_path / "b")
    os.symlink("/etc/passwd", b / "passwd")
    assert refused(store, b).check == "symlink"


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/evil", "sub/x.npy", ".."])
def test_dotdot_and_absolute_paths(store: ReleaseStore, signed: Path, tmp_path: Path,
                                   key: Ed25519PrivateKey, name: str) -> None:
    b = copy_release(signed, tmp_path / "b")
    resign(b, key, lambda m: m["files"].update({name: {"size": 1, "sha256": "0" * 64}}))
    e = refused(store, b)
    assert e.check == "path" and repr(name) in str(e)


def test_older_release(store: ReleaseStore, signed: Path, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store.stage(signed, None)
    b = copy_release(signed, tmp_path / "b")
    resign(b, key, lambda m: m.update(release=4))
    before = store.state()
    with pytest.raises(Refused) as info:
        store.stage(b, None)
    assert info.value.check == "downgrade" and "sorterd models pin 4" in str(info.value)
    assert store.releases() == [5] and store.state() == before
    store.pin(4)  # the operator goes back on purpose: exactly that release
    assert store.stage(b, None).release == 4
    assert store.state().highest_accepted == 5 and store.state().pinned is None


def test_oversized(tmp_path: Path, signed: Path, key: Ed25519PrivateKey) -> None:
    small = ReleaseStore(tmp_path / "state", [key.public_key()], 1_000_000)
    e = refused(small, signed)
    assert e.check == "oversized" and "the limit is 1000000" in str(e)


def test_outputs_not_matching_the_manifest(store: ReleaseStore, signed: Path, tmp_path: Path,
                                           key: Ed25519PrivateKey) -> None:
    pytest.importorskip("onnx")
    b = copy_release(signed, tmp_path / "b")
    rename_output(b / "model.onnx", "clarity_logits", "clarity_out")
    resign(b, key)
    e = refused(store, b)
    assert e.check == "onnx" and "no output 'clarity_logits'" in str(e)


def test_fails_the_reference_kit(store: ReleaseStore, signed: Path) -> None:
    good = faithful_kit()
    relabelled = RecordedKit(good.crops, [(c, "opaque" if k != "opaque" else "transparent") for c, k in good.labels])
    e = refused(store, signed, kit_gate(relabelled))
    assert e.check == "reference-kit" and "< 90%" in str(e)


def test_no_kit_is_refused_too(store: ReleaseStore, signed: Path) -> None:
    def gate(v: Verified) -> list[tuple[str, str]]:
        return qa_problems(OnnxModel(v.path), v.path, None, DecisionConfig())
    assert refused(store, signed, gate).check == "reference-kit"


def test_activate_rollback_and_restart(store: ReleaseStore, signed: Path, tmp_path: Path,
                                       key: Ed25519PrivateKey) -> None:
    store.stage(signed, None)
    store.activate(5)
    b = copy_release(signed, tmp_path / "b")
    resign(b, key, lambda m: m.update(release=6))
    store.stage(b, None)
    s = store.activate(6)
    assert (s.active, s.previous) == (6, 5)
    s = store.rollback("health check")
    assert (s.active, s.previous) == (5, 6) and s.history[-1]["why"] == "health check"
    # The health watch's rollback names the release it judged: not the active one any more, nothing moves.
    with pytest.raises(StoreError, match=r"^release 6 is no longer the active release \(release 5 is\): not rolled back$"):
        store.rollback("health check", of=6)
    assert (store.state().active, store.state().previous) == (5, 6)
    with pytest.raises(StoreError, match="release 9: not in"):
        store.activate(9)
    # A stored release damaged on disk is refused at activation, by the same checks.
    (store.path(6) / "golden_inputs.npy").write_bytes(b"damaged")
    with pytest.raises(Refused, match="^file-size: "):
        store.activate(6)
    assert store.state().active == 5


def test_verify_is_the_same_function_with_a_floor(signed: Path, key: Ed25519PrivateKey) -> None:
    v = verify_release(signed, [key.public_key()], ReleaseFloor(4), MAX)
    assert v.release == 5 and v.onnx_sha256 == v.manifest.onnx_sha256
    with pytest.raises(Refused, match="^downgrade: "):
        verify_release(signed, [key.public_key()], ReleaseFloor(5), MAX)


def test_release_key_files(tmp_path: Path) -> None:
    public, secret = release_keys.generate(tmp_path, "trainer")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    priv = release_keys.load_private(secret)
    assert release_keys.key_id(release_keys.load_public(public)) == release_keys.key_id(priv.public_key())
    with pytest.raises(KeyFileError, match="already exists"):
        release_keys.generate(tmp_path, "trainer")
    secret.chmod(0o640)
    with pytest.raises(KeyFileError, match="mode 0640 lets others read a secret key"):
        release_keys.load_private(secret)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        release_keys.load_public(_junk(tmp_path))


def _junk(tmp_path: Path) -> Path:
    p = tmp_path / "junk.release.pub"
    p.write_text("not a key\n")
    return p


def test_copy_of_store_root_is_not_needed(tmp_path: Path) -> None:
    # The store creates its layout on first use.
    s = ReleaseStore(tmp_path / "deep" / "state", [], MAX)
    assert {p.name for p in s.root.iterdir()} == {"releases", "staging"}
    shutil.rmtree(s.root)


def test_an_onnx_that_does_not_load(store: ReleaseStore, signed: Path, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    b = copy_release(signed, tmp_path / "b")
    (b / "model.onnx").write_bytes(b"\x08\x07not a protobuf graph" * 10)
    resign(b, key)
    e = refused(store, b)
    assert e.check == "onnx" and "onnxruntime cannot load it" in str(e)
