"""Child of test_release_powercut: stages and activates releases FIRST.. of the signed release at
SRC (re-signed with the key in KEYFILE, raw 32 bytes) into the store at ROOT, printing each step
(flushed), until killed.
    python tests/release_kill_child.py ROOT SRC KEYFILE FIRST
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd.release.store import ReleaseStore
from tests.release_fakes import resign


def main() -> None:
    root, src, keyfile, first = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    key = Ed25519PrivateKey.from_private_bytes(keyfile.read_bytes())
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    work = root.parent / "incoming"
    print("ready", flush=True)
    for n in range(first, first + 1000):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        resign(work, key, lambda m, n=n: m.update(release=n))
        print(f"staging {n}", flush=True)
        store.stage(work, None)
        print(f"activating {n}", flush=True)
        store.activate(n)
        print(f"active {n}", flush=True)


if __name__ == "__main__":
    main()
