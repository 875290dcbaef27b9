"""Power cut (SIGKILL) at every step of a download over the link (`download.*` of
`sorterd.release.crash.STEPS`), 5 times each, deterministically (SORTERD_CRASH_AT=step:k: the
child kills itself on the k-th pass) -- and at the staging steps, which a download passes only
in the helper process that stages it (`sorterd.release.prepare`): the helper kills the sorter
with itself, as a power cut would.  After each kill the restarted sorter's files open clean --
state.json and reports.json parse, staging holds nothing but a download's .part and its offer, the
.part is a prefix of the offered stream (it resumes) -- every stored release verifies whole, and
what start-up runs is the active release: the old one or the new one, never a mix, never none
once one was active.  A last run without a kill finishes every release from where it was."""

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
from linkfakes import KeySet

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.release.crash import ENV, STEPS
from sorterd.release.download import OFFER_SUFFIX, REPORTS
from sorterd.release.qa import KIT_FILE, save_kit
from sorterd.release.store import PART_SUFFIX, STATE, ReleaseStore
from sorterd.release.swap import open_active
from sorterd.trainer.releases import OfferShelf, signed_dir
from tests.release_fakes import faithful_kit, make_release

KILLS = 5
CYCLES = 5
REPO = Path(__file__).resolve().parents[1]
DOWNLOAD_STEPS = [s for s in STEPS if s.startswith("download.")]
# Passed in the staging helper only (verify.* are passed by the child's trainer too: offer_bundle verifies).
HELPER_STEPS = ["stage.copy", "stage.verify", "stage.qa", "stage.rename"]
ONCE_PER_RELEASE = ["download.complete", "download.unpacked", "stage.verify", "stage.qa"]  # nothing accepted yet


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Ed25519PrivateKey]:
    tmp = tmp_path_factory.mktemp("pushcrash")
    key = Ed25519PrivateKey.generate()
    keyfile = tmp / "k.raw"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption()))
    kitdir = tmp / "cal"
    (kitdir / "sorter-1" / "2026-12-01").mkdir(parents=True)
    save_kit(kitdir / "sorter-1" / "2026-12-01" / KIT_FILE, faithful_kit())
    return make_release(tmp / "src", key, 1), keyfile, kitdir, key


def _after_restart(root: Path, data: Path, key: Ed25519PrivateKey, was_active: bool) -> tuple[int | None, int]:
    """The restarted sorter's view (module docstring); (the active release, the .part's size or -1)."""
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    store.clean_staging()
    left = sorted(p.name for p in (root / "staging").iterdir())
    assert all(n.endswith((PART_SUFFIX, OFFER_SUFFIX)) for n in left), left  # no unpack dir, no staged copy
    assert len(left) <= 2 and not list(root.glob(f".{STATE}.*"))
    state = store.state()
    if (root / REPORTS).exists():
        json.loads((root / REPORTS).read_text())  # parses: written by atomic rename
    for r in store.releases():
        assert store.verify_stored(r).release == r  # nothing half-moved into releases/
    parts = [n for n in left if n.endswith(PART_SUFFIX)]
    size = (root / "staging" / parts[0]).stat().st_size if parts else -1
    if parts:  # a download to resume: exactly a prefix of the offered stream
        n = int(parts[0].removesuffix(PART_SUFFIX))
        shelf = OfferShelf(signed_dir(data))
        shelf.refresh()
        got = (root / "staging" / parts[0]).read_bytes()
        want = b"".join(shelf.read(n, off, 262144) for off in range(0, len(got), 262144))[:len(got)]
        assert got == want, f"{parts[0]}: not a prefix of release {n}'s stream"
        assert f"{n}{OFFER_SUFFIX}" in left
    if was_active:
        assert state.active is not None, "a power cut left no active release"
    model = open_active(store, load_config(config.sim_config_path()).inference)
    assert (None if model is None else model.release) == state.active  # start-up runs what state.json says
    if model is not None:
        model.close()
    return state.active, size


@pytest.mark.slow
@pytest.mark.parametrize("step", DOWNLOAD_STEPS + HELPER_STEPS)
def test_sigkill_at_every_download_step(step: str, setup: tuple[Path, Path, Path, Ed25519PrivateKey],
                                        tmp_path: Path) -> None:
    src, keyfile, kitdir, key = setup
    KeySet(tmp_path / "link")
    root, data = tmp_path / "models", tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "tests" / "release_push_child.py"), str(root), str(data), str(src),
            str(keyfile), str(kitdir), str(tmp_path / "link"), str(CYCLES)]
    was_active, actives, sizes = False, [], []
    for k in range(1, KILLS + 1):
        child = subprocess.run(args, env={**env, ENV: f"{step}:{k}"}, capture_output=True, text=True, timeout=600)
        assert child.returncode == -signal.SIGKILL, f"{step}:{k} was never reached: rc {child.returncode}\n{child.stderr}"
        active, size = _after_restart(root, data, key, was_active)
        was_active = was_active or active is not None
        actives.append(active)
        sizes.append(size)
    assert actives == sorted(actives, key=lambda a: a or 0)  # it only moved on between the kills
    if step == "download.chunk":  # each run resumed the .part the kill before left (k more chunks each)
        assert sizes[0] > 0 and all(b > a for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    elif step in ONCE_PER_RELEASE:  # killed with the whole stream on disk: run k finished that release first, then k - 1 more
        want = [k * (k - 1) // 2 or None for k in range(1, KILLS + 1)]
        assert all(s > 0 for s in sizes) and actives == want, (actives, sizes)
    else:  # killed in the helper while it staged a whole download (per file; after the rename): the .part stays
        assert all(s > 0 for s in sizes), sizes
    # No kill: every release finishes, the leftovers resumed or discarded, nothing left behind.
    child = subprocess.run(args[:-1] + ["1"], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and "done" in child.stdout, child.stderr
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    assert store.state().active == store.state().highest_accepted == max(store.releases())
    assert not list((root / "staging").iterdir())
