"""Power cut (SIGKILL) at every named step of staging, verification, activation, the swap and the
TensorRT engine build (`sorterd.release.crash.STEPS`), 5 times each, deterministically: the child
kills itself on the k-th pass of the step (SORTERD_CRASH_AT=step:k).  After each kill the restarted
sorter's store opens clean (state.json parses, no temporary or staged leftovers), every stored
release verifies whole, and what start-up runs is the active release -- the old one or the new
one, never a mix, never none once one was active.  The engine steps run the release path with
[inference] type = "tensorrt" on the faithful fake (tests/fake_tensorrt.py); there the restart
also finds every release's engine cache sane: no sidecar that does not describe the engine beside
it, and the active release's engine loaded only when its sidecar matches -- a sidecar-less one is
rebuilt (the fake's build count, the report's reason) and a cut write's temporary file removed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.parts.inference import InferenceOptions
from sorterd.parts.inference import tensorrt as trtmod
from sorterd.parts.inference.tensorrt import TensorRTModel
from sorterd.release.crash import ENV, STEPS
from sorterd.release.qa import KIT_FILE, save_kit
from sorterd.release.store import STATE, ReleaseStore
from sorterd.release.swap import ReleasedModel, open_active
from tests.fake_tensorrt import FakeTensorRT
from tests.release_crash_child import trt_options
from tests.release_fakes import faithful_kit, make_release

KILLS = 5
REPO = Path(__file__).resolve().parents[1]
ENGINE_STEPS = [s for s in STEPS if s.startswith("engine.")]  # reached with [inference] type = "tensorrt" only
STORE_STEPS = [s for s in STEPS if not s.startswith(("download.", "engine."))]  # download.*: tests/test_release_push.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Ed25519PrivateKey]:
    tmp = tmp_path_factory.mktemp("crash")
    key = Ed25519PrivateKey.generate()
    keyfile = tmp / "k.raw"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption()))
    kitdir = tmp / "cal"
    (kitdir / "sorter-1" / "2026-12-01").mkdir(parents=True)
    save_kit(kitdir / "sorter-1" / "2026-12-01" / KIT_FILE, faithful_kit())
    return make_release(tmp / "src", key, 1), keyfile, kitdir, key


def _after_restart(root: Path, key: Ed25519PrivateKey, was_active: bool,
                   options: InferenceOptions | None = None) -> tuple[int | None, ReleasedModel | None]:
    """The restarted sorter's view: clean files, whole releases, the active one runs (the model
    start-up opened, still open: the caller closes it)."""
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    store.clean_staging()
    assert not list((root / "staging").iterdir()) and not list(root.glob(f".{STATE}.*"))
    raw = json.loads((root / STATE).read_text()) if (root / STATE).exists() else {}
    state = store.state()
    assert set(raw) <= {"active", "previous", "highest_accepted", "pinned", "history"}
    for r in store.releases():
        assert store.verify_stored(r).release == r  # nothing half-moved into releases/
    assert state.highest_accepted >= max(store.releases(), default=0)
    if was_active:
        assert state.active is not None, "a power cut left no active release"
    model = open_active(store, options or load_config(config.sim_config_path()).inference)
    assert (None if model is None else model.release) == state.active  # start-up runs what state.json says
    if model is not None:  # and it is that release's model, not another's (a mix)
        assert model.manifest.onnx_sha256 == store.verify_stored(model.release).onnx_sha256
    return state.active, model


@pytest.mark.slow
@pytest.mark.parametrize("step", STORE_STEPS)
def test_sigkill_at_every_step(step: str, setup: tuple[Path, Path, Path, Ed25519PrivateKey], tmp_path: Path) -> None:
    src, keyfile, kitdir, key = setup
    root = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    was_active, actives = False, []
    for k in range(1, KILLS + 1):
        child = subprocess.run(
            [sys.executable, str(REPO / "tests" / "release_crash_child.py"), str(root), str(src), str(keyfile),
             str(kitdir), "5"], env={**env, ENV: f"{step}:{k}"}, capture_output=True, text=True, timeout=300)
        assert child.returncode == -signal.SIGKILL, f"{step}:{k} was never reached: rc {child.returncode}\n{child.stderr}"
        active, model = _after_restart(root, key, was_active)
        if model is not None:
            model.close()
        was_active = was_active or active is not None
        actives.append(active)
    # The kills landed at different places of the sequence: the releases moved on between them.
    assert actives == sorted(actives, key=lambda a: a or 0)


def _child(step: str, k: int, root: Path, setup: tuple[Path, Path, Path, Ed25519PrivateKey], *extra: str) -> None:
    src, keyfile, kitdir, _ = setup
    child = subprocess.run(
        [sys.executable, str(REPO / "tests" / "release_crash_child.py"), str(root), str(src), str(keyfile),
         str(kitdir), "5", *extra], env={**os.environ, "PYTHONPATH": str(REPO), ENV: f"{step}:{k}"},
        capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, f"{step}:{k} was never reached: rc {child.returncode}\n{child.stderr}"


def _cache(folder: Path) -> str:
    """What a power cut left in one engine cache: 'whole' (engine + its sidecar), 'no-sidecar',
    'none'; with '+tmp' when a cut write's temporary file is there.  A sidecar describing bytes
    other than the engine beside it (a torn pair: the write order broken) fails the test."""
    engines = sorted(folder.glob("*.engine")) if folder.is_dir() else []
    assert len(engines) <= 1, engines  # one key per release and sorter
    what = "none"
    for engine in engines:
        side = engine.with_name(engine.name + ".json")
        if not side.exists():
            what = "no-sidecar"
            continue
        meta, data = json.loads(side.read_text()), engine.read_bytes()
        assert (meta["length"], meta["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), f"torn: {engine}"
        what = "whole"
    tmp = folder.is_dir() and any(folder.glob(".*.tmp"))
    return what + ("+tmp" if tmp else "")


def _engine_after_restart(root: Path, model: ReleasedModel, fake: FakeTensorRT, before: str) -> None:
    """The engine start-up went live with: loaded only from a whole cache entry, else rebuilt."""
    inner = model.inner
    assert isinstance(inner, TensorRTModel)
    assert inner.ready.wait(120)
    r = inner.report
    assert r.state == "live", (r.state, r.detail)
    if before.startswith("whole"):
        assert fake.builds == 0 and not r.built, f"a whole cached engine was rebuilt ({r.rebuilt_why})"
    else:
        assert fake.builds == 1 and r.built, f"an engine was loaded from a cache that was {before}"
        reason = "unreadable sidecar" if before.startswith("no-sidecar") else "no cached engine"
        assert reason in r.rebuilt_why, r.rebuilt_why
    assert _cache(root / "releases" / f"{model.release}.engines") == "whole"  # and the cut's .tmp is gone


@pytest.fixture
def fake_trt() -> Iterator[FakeTensorRT]:
    """This process's TensorRT backend on a fresh fake (as the child's), the installed libraries again after."""
    fake = FakeTensorRT()
    trtmod.use_modules(lambda: (fake, fake.cudart))
    yield fake
    trtmod.use_modules(None)


@pytest.mark.slow
@pytest.mark.parametrize("step", ENGINE_STEPS)
def test_sigkill_in_the_engine_build(step: str, setup: tuple[Path, Path, Path, Ed25519PrivateKey], tmp_path: Path,
                                     fake_trt: FakeTensorRT) -> None:
    key = setup[3]
    root = tmp_path / "state"
    options = trt_options(load_config(config.sim_config_path()).inference)
    was_active, actives, found = False, [], Counter[str]()
    for k in range(1, KILLS + 1):
        _child(step, k, root, setup, "tensorrt")
        caches = {p.name: _cache(p) for p in [*(root / "releases").glob("*.engines"), *(root / "staging").glob("*.engines")]}
        found.update(caches.values())
        active = ReleaseStore(root, [key.public_key()], 50_000_000).state().active
        before = caches.get(f"{active}.engines", "none")
        if active is not None:
            found[f"active {before}"] += 1
        fake_trt.builds = 0
        active, model = _after_restart(root, key, was_active, options)
        if model is not None:
            _engine_after_restart(root, model, fake_trt, before)
            model.close()
        was_active = was_active or active is not None
        actives.append(active)
    assert actives == sorted(actives, key=lambda a: a or 0)
    # The passes come in one order (the child waits for each swapped-in engine): a child's first
    # pass is its first stage's QA-gate build (staging/incoming.<pid>.engines, removed at the restart;
    # its later stages find that engine cached: the same ONNX), every later one the build of the
    # release just activated.  So k = 2..5 cut the active release's own build, and the restart found
    # its cache as the step leaves it, and loaded it (whole) or rebuilt it (anything else).
    left = {"engine.built": "none", "engine.writing": "none+tmp", "engine.written": "no-sidecar",
            "engine.stored": "whole"}[step]
    assert found[f"active {left}"] == KILLS - 1, found
