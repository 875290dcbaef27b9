"""Power cut (SIGKILL) at every named step of staging, verification, activation and the swap
(`sorterd.release.crash.STEPS`), 5 times each, deterministically: the child kills itself on the
k-th pass of the step (SORTERD_CRASH_AT=step:k).  After each kill the restarted sorter's store
opens clean (state.json parses, no temporary or staged leftovers), every stored release verifies
whole, and what start-up runs is the active release -- the old one or the new one, never a mix,
never none once one was active."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.release.crash import ENV, STEPS
from sorterd.release.qa import KIT_FILE, save_kit
from sorterd.release.store import STATE, ReleaseStore
from sorterd.release.swap import open_active
from tests.release_fakes import faithful_kit, make_release

KILLS = 5
REPO = Path(__file__).resolve().parents[1]
STORE_STEPS = [s for s in STEPS if not s.startswith("download.")]  # the link's: tests/test_release_push.py


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


def _after_restart(root: Path, key: Ed25519PrivateKey, was_active: bool) -> int | None:
    """The restarted sorter's view: clean files, whole releases, the active one runs."""
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
    model = open_active(store, load_config(config.sim_config_path()).inference)
    assert (None if model is None else model.release) == state.active  # start-up runs what state.json says
    if model is not None:
        model.close()
    return state.active


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
        active = _after_restart(root, key, was_active)
        was_active = was_active or active is not None
        actives.append(active)
    # The kills landed at different places of the sequence: the releases moved on between them.
    assert actives == sorted(actives, key=lambda a: a or 0)
