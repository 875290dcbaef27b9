"""Child of test_release_push_crash: a trainer and a sorter in one process, pushing releases over
the real link until the crash point named in SORTERD_CRASH_AT kills it (sorterd.release.crash).
Start-up as the daemon does it (the store opened, staging cleaned), then per cycle: release n
(re-signed from SRC with the key in KEYFILE, raw 32 bytes) offered on the trainer's shelf, the
sorter downloads it (auto_activate on), stages it with the QA gate (the kit in KITDIR) in the
helper process, as the daemon does -- CYCLES
times.  Prints "done" when every cycle's release is accepted and reported.
    python tests/release_push_child.py ROOT DATA SRC KEYFILE KITDIR LINKKEYS CYCLES
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from linkfakes import FakeInbox, FakeOutbox

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.link import keys
from sorterd.link.client import ClientOptions, LinkClient
from sorterd.link.server import LinkServer
from sorterd.release.download import Downloader, reports_for
from sorterd.release.prepare import ChildStager
from sorterd.release.qa import KitPolicy, latest_kit
from sorterd.release.store import ReleaseStore
from sorterd.trainer.releases import OfferShelf, ReleaseBook, book_path, offer_bundle, signed_dir
from tests.release_fakes import resign


async def main() -> None:
    root, data, src, keyfile, kitdir, linkkeys, cycles = (Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                                                          Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]),
                                                          int(sys.argv[7]))
    key = Ed25519PrivateKey.from_private_bytes(keyfile.read_bytes())
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    store.clean_staging()
    # Staged as the daemon stages it: in the helper process (whose crash points kill this one too).
    stager = ChildStager(store, load_config(config.sim_config_path()).inference,
                         KitPolicy(lambda: latest_kit(kitdir, "sorter-1")), 120.0)
    reports = reports_for(store)
    downloader = Downloader(store, stager, reports, running=lambda: store.state().active, auto_activate=True)
    t_pub, t_sec = keys.load_secret(linkkeys / "trainer" / "trainer.key_secret")
    s_pub, s_sec = keys.load_secret(linkkeys / "sorters" / "sorter-a.key_secret")
    server = LinkServer("tcp://127.0.0.1:*", t_pub, t_sec, linkkeys / "allowed", FakeInbox(), log_every_s=0.0,
                        shelf=OfferShelf(signed_dir(data)), ledger=ReleaseBook(book_path(data)), offer_every_s=0.2,
                        shelf_poll_s=0.1)
    await server.start()
    serving = asyncio.ensure_future(server.run())
    client = LinkClient(ClientOptions(server.endpoint, t_pub, s_pub, s_sec, heartbeat_s=0.1, ack_timeout_s=2.0,
                                      reconnect_max_s=0.4), FakeOutbox([]), downloader)
    linking = asyncio.ensure_future(client.run())
    first = store.state().highest_accepted + 1
    for n in range(first, first + cycles):
        if not (signed_dir(data) / str(n)).exists():
            work = root.parent / "incoming"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            resign(work, key, lambda m, n=n: m.update(release=n))
            offer_bundle(work, data, [key.public_key()])
        deadline = time.monotonic() + 240
        while not (store.state().active == n and not reports.pending()):
            assert time.monotonic() < deadline, f"release {n} never arrived"
            await asyncio.sleep(0.02)
    print("done", flush=True)
    client.stop()
    await linking
    server.close()
    await serving


if __name__ == "__main__":
    asyncio.run(main())
