"""Releases pushed over the real link on loopback (issue 12 item 3): the trainer's shelf offers,
the sorter downloads in chunks into staging/<N>.part, stages it through the store's verification
and QA gate, and reports; the trainer keeps every answer (releases/results.json, `trainer status`).

Real LinkServer and LinkClient with CurveZMQ keys in tmp; the trainer's shelf and the sorter's
store are the real ones (a tampering or counting shelf is a subclass that changes one thing).
Waits are on conditions with generous deadlines, never fixed sleeps that assert.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from linkfakes import FakeInbox, FakeOutbox, KeySet

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.link import wire
from sorterd.link.client import ClientOptions, LinkClient
from sorterd.link.server import LinkServer
from sorterd.release import prepare
from sorterd.release.download import REPORTS, Downloader, ResultQueue, reports_for, rollback_reporter
from sorterd.release.prepare import ChildStager, Retries, Staged
from sorterd.release.qa import KIT_FILE, KitPolicy, save_kit
from sorterd.release.store import PART_SUFFIX, ReleaseStore
from sorterd.release.verify import Refused
from sorterd.trainer.releases import OfferError, OfferShelf, ReleaseBook, book_path, offer_bundle, read_book, signed_dir
from sorterd.trainer.status import status_table
from tests.release_fakes import faithful_kit, helper_dies_at, make_release

FAST = dict(heartbeat_s=0.1, ack_timeout_s=1.0, reconnect_max_s=0.4)
SORTER = "sorter-a"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def pings_after(server: LinkServer, sorter: str, seconds: float) -> None:
    """Until `sorter` has sent the server two more messages once `seconds` have passed: what the
    server does on a PING (an offer when one is due) has had its chance by then."""
    due = time.monotonic() + seconds
    await until(lambda: time.monotonic() > due)
    seen = server.links[sorter].messages
    await until(lambda: server.links[sorter].messages >= seen + 2)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, Path, Path, Path]:
    """A release key, signed releases 2 and 3 of models/default, and a reference kit that the right model passes."""
    tmp = tmp_path_factory.mktemp("push")
    key = Ed25519PrivateKey.generate()
    kit = tmp / "cal" / "sorter-1" / "2026-12-01" / KIT_FILE
    kit.parent.mkdir(parents=True)
    save_kit(kit, faithful_kit())
    return key, make_release(tmp / "r2", key, 2), make_release(tmp / "r3", key, 3), kit


class CountingShelf(OfferShelf):
    """The real shelf; every read's offset recorded (in order)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[int] = []

    def read(self, release: int, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        return super().read(release, offset, length)


class TamperingShelf(CountingShelf):
    """A trainer (or a path) that serves one byte of the stream altered: the last byte of the stream."""

    def read(self, release: int, offset: int, length: int) -> bytes:
        data = bytearray(super().read(release, offset, length))
        last = self._shelf[release].offer.total_bytes - 1
        if offset <= last < offset + len(data):
            data[last - offset] ^= 0xFF
        return bytes(data)


class RecordingStager(ChildStager):
    """The daemon's stager (staging in the helper process), every answer kept."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.staged: list[Staged] = []

    def stage(self, release: int, unpacked: Path) -> Staged:
        got = super().stage(release, unpacked)
        self.staged.append(got)
        return got


class Sorter:
    """One sorter's release side: the real store, the daemon's stager (the QA gate in the helper
    process, as sorterd run composes it) and the result queue."""

    def __init__(self, root: Path, key: Ed25519PrivateKey, kit: Path, max_bytes: int = 50_000_000,
                 timeout_s: float = 120.0) -> None:
        self.store = ReleaseStore(root, [key.public_key()], max_bytes)
        self.store.clean_staging()
        self.stager = RecordingStager(self.store, load_config(config.sim_config_path()).inference,
                                      KitPolicy(lambda: kit), timeout_s)
        self.reports = reports_for(self.store)
        self.downloader = Downloader(self.store, self.stager, self.reports, running=lambda: self.store.state().active)


class Trainer:
    """The real server with a shelf in DATA/releases/signed and its book."""

    def __init__(self, ks: KeySet, data: Path, shelf_cls: type[CountingShelf] = CountingShelf) -> None:
        self.shelf = shelf_cls(signed_dir(data))
        self.book = ReleaseBook(book_path(data))
        self.server = LinkServer("tcp://127.0.0.1:*", ks.trainer_public, ks.trainer_secret, ks.allowed, FakeInbox(),
                                 log_every_s=0.0, shelf=self.shelf, ledger=self.book, offer_every_s=0.5,
                                 shelf_poll_s=0.2)
        self.task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self.task = asyncio.ensure_future(self.server.run())

    async def stop(self) -> None:
        self.server.close()
        assert self.task is not None
        await self.task


def client_for(ks: KeySet, endpoint: str, sorter: Sorter, chunk: int = wire.MAX_CHUNK_BYTES) -> LinkClient:
    opts = ClientOptions(endpoint, ks.trainer_public, ks.sorter_public, ks.sorter_secret, release_chunk_bytes=chunk,
                         **FAST)  # type: ignore[arg-type]
    return LinkClient(opts, FakeOutbox([]), sorter.downloader)


def answer(data: Path, release: int) -> dict[str, Any] | None:
    return read_book(data).get(SORTER, {}).get("results", {}).get(str(release))


def until_answered(ks: KeySet, data: Path, sorter: Sorter, release: int = 2) -> Trainer:
    """A trainer and `sorter`'s link client on loopback until the trainer's book has the sorter's
    answer for `release` and nothing waits in its queue; both stopped; the trainer returned."""
    async def go() -> Trainer:
        trainer = Trainer(ks, data)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, release) is not None and not sorter.reports.pending())
        client.stop()
        await task
        await trainer.stop()
        return trainer

    result: Trainer = run(go())
    return result


def test_offer_download_stage_accept_visible_in_trainer_status(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    v, where = offer_bundle(r2, data, [key.public_key()])
    assert v.release == 2 and where == signed_dir(data) / "2"
    with pytest.raises(OfferError, match="already offered"):
        offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit)

    async def go() -> None:
        trainer = Trainer(ks, data)
        await trainer.start()
        loop_thread = threading.get_ident()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None and not sorter.reports.pending())
        client.stop()
        await task
        await trainer.stop()
        assert threading.get_ident() == loop_thread
        offsets = trainer.shelf.reads
        total = trainer.shelf.newest().total_bytes  # type: ignore[union-attr]
        # One chunk at a time, in order, each the next one (one asked again after a slow answer at most
        # repeats itself): nothing skipped, never out of order.
        assert offsets == sorted(offsets) and set(offsets) == set(range(0, total, wire.MAX_CHUNK_BYTES))
        assert trainer.server.stats.chunks == len(offsets)

    run(go())
    assert answer(data, 2)["status"] == "accepted"  # type: ignore[index]
    # Staged by the helper process (verify + golden + kit), not in this one.
    assert [(g.release, g.pid != os.getpid() and g.pid > 0) for g in sorter.stager.staged] == [(2, True)]
    state = sorter.store.state()
    assert sorter.store.releases() == [2] and state.highest_accepted == 2
    assert state.active is None  # [models] auto_activate is off: the operator activates it
    assert sorter.store.verify_stored(2).release == 2
    assert not list((tmp_path / "models" / "staging").iterdir())  # .part, its offer, the unpack dir: gone
    assert json.loads((tmp_path / "models" / REPORTS).read_text()) == {"pending": []}
    table = status_table(data).splitlines()
    assert "release" in table[0] and "offered" in table[0]
    row = table[1]
    assert row.startswith(SORTER) and " r2 accepted" in row and " bundle " in row


def test_auto_activate_makes_it_the_active_release(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit)
    sorter.downloader.auto_activate = True

    async def go() -> None:
        trainer = Trainer(ks, data)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None)
        # The sorter now runs r2 (as the ReleaseWatcher would swap it in): the next PING says so.
        await until(lambda: read_book(data).get(SORTER, {}).get("release") == 2)
        client.stop()
        await task
        await trainer.stop()

    run(go())
    assert sorter.store.state().active == 2


def test_tampered_chunk_refused_naming_the_hash_check(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit)
    counted: list[str] = []
    sorter.downloader.on_refused = counted.append  # what the daemon counts in sorterd_model_refusals_total

    async def go() -> None:
        trainer = Trainer(ks, data, TamperingShelf)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None and not sorter.reports.pending())
        offers = trainer.server.stats.offers
        # An answered release is not offered again: the sorter's PINGs go on past two offer intervals
        # (each such PING would carry a new offer), however slowly a loaded machine delivers them.
        await pings_after(trainer.server, SORTER, 2 * trainer.server.offer_every_s)
        assert trainer.server.stats.offers == offers
        client.stop()
        await task
        await trainer.stop()

    run(go())
    got = answer(data, 2)
    assert got is not None and got["status"] == "refused" and got["check"] == "file-hash", got
    assert counted == ["file-hash"]
    assert sorter.store.releases() == [] and sorter.store.state().highest_accepted == 0  # nothing accepted
    assert not list((tmp_path / "models" / "staging").iterdir())
    assert "r2 refused (file-hash:" in status_table(data)


@pytest.mark.parametrize(("how", "check"), [("killed", "prepare-died"), ("slow", "prepare-timeout")])
def test_a_staging_helper_that_keeps_dying_or_timing_out_is_retried_then_reported_and_nothing_staged(
        tmp_path: Path, signed: Any, monkeypatch: pytest.MonkeyPatch, how: str, check: str) -> None:
    """The helper killed at stage.rename (releases/2 moved in, not recorded), or given too little
    time, every time: the whole download is kept and staged again on the trainer's next offers (no
    byte downloaded twice), and after the schedule's last try the trainer is told which check, the store
    holds nothing of it, and it is not offered again."""
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    if how == "killed":
        helper_dies_at(monkeypatch, "stage.rename")
    sorter = Sorter(tmp_path / "models", key, kit, timeout_s=120.0 if how == "killed" else 0.05)
    sorter.downloader.retries = Retries(first_s=0.2, attempts=3)
    tries: list[int] = []
    stage = sorter.stager.stage

    def counted(release: int, unpacked: Path) -> Staged:
        tries.append(release)
        return stage(release, unpacked)

    sorter.stager.stage = counted  # type: ignore[method-assign]

    async def go() -> None:
        trainer = Trainer(ks, data)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None and not sorter.reports.pending())
        offers = trainer.server.stats.offers
        await pings_after(trainer.server, SORTER, 2 * trainer.server.offer_every_s)  # answered: offered no more
        assert trainer.server.stats.offers == offers
        client.stop()
        await task
        await trainer.stop()
        total = trainer.shelf.newest().total_bytes  # type: ignore[union-attr]
        assert sorted(set(trainer.shelf.reads)) == trainer.shelf.reads  # each chunk read once: kept, not fetched again
        assert set(trainer.shelf.reads) == set(range(0, total, wire.MAX_CHUNK_BYTES))

    run(go())
    assert tries == [2, 2, 2]
    got = answer(data, 2)
    assert got is not None and got["status"] == "refused" and got["check"] == check, got
    assert "nothing was staged" in got["detail"] and "tried 3 times" in got["detail"]
    assert sorter.store.releases() == [] and sorter.store.state().highest_accepted == 0
    assert not list((tmp_path / "models" / "staging").iterdir())  # no copy, no .part, no unpack dir
    assert f"r2 refused ({check}:" in status_table(data)


def test_a_staging_helper_killed_once_is_retried_from_the_kept_download_and_accepted(
        tmp_path: Path, signed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper killed the first time only (a passing overload, a cgroup OOM kill): nothing is
    reported then; the next offer stages the kept download again and it is accepted, downloaded once."""
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit)
    sorter.downloader.retries = Retries(first_s=0.2)
    real = prepare.child_command
    helper_dies_at(monkeypatch, "stage.rename")
    dying = prepare.child_command
    calls: list[int] = []

    def first_dies() -> list[str]:
        calls.append(1)
        return dying() if len(calls) == 1 else real()

    monkeypatch.setattr(prepare, "child_command", first_dies)
    trainer = until_answered(ks, data, sorter)
    assert sorted(set(trainer.shelf.reads)) == trainer.shelf.reads  # downloaded once
    assert len(calls) == 2
    assert answer(data, 2)["status"] == "accepted"  # type: ignore[index]
    assert sorter.store.releases() == [2] and sorter.store.state().highest_accepted == 2


def test_a_manifest_numbered_unlike_its_offer_is_refused(tmp_path: Path, signed: Any) -> None:
    """A trainer's shelf holding release 3's signed bundle under 2/ (a copy by hand): the sorter
    stages what the manifest says only when it is what was offered."""
    key, _, r3, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    shelf = signed_dir(data) / "2"
    shelf.mkdir(parents=True)
    for f in r3.iterdir():
        (shelf / f.name).write_bytes(f.read_bytes())
    sorter = Sorter(tmp_path / "models", key, kit)

    until_answered(ks, data, sorter)
    got = answer(data, 2)
    assert got is not None and got["status"] == "refused" and got["check"] == "manifest", got
    assert "signed manifest is release 3, but it was offered as release 2" in got["detail"]
    assert sorter.store.releases() == [] and sorter.store.state().highest_accepted == 0


def test_download_cut_then_resumed_from_the_part_size(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    root = tmp_path / "models"
    part = root / "staging" / f"2{PART_SUFFIX}"
    chunk = 64 * 1024

    async def cut() -> int:
        trainer = Trainer(ks, data)
        await trainer.start()
        first = Sorter(root, key, kit)
        client = client_for(ks, trainer.server.endpoint, first, chunk)
        task = asyncio.ensure_future(client.run())
        await until(lambda: part.is_file() and part.stat().st_size >= 20 * chunk)
        client.stop()  # the link cut in the middle
        await task
        await trainer.stop()
        return len(trainer.shelf.reads)

    async def resume() -> list[int]:
        # "Restart": a new store, downloader and client on the same disk (and a new trainer process).
        trainer = Trainer(ks, data)
        await trainer.start()
        second = Sorter(root, key, kit)
        assert part.stat().st_size == size  # start-up keeps the .part
        client = client_for(ks, trainer.server.endpoint, second, chunk)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None and not second.reports.pending())
        client.stop()
        await task
        await trainer.stop()
        return trainer.shelf.reads

    # The stop drops a chunk write still in its thread; the loop's end waits for that thread
    # (asyncio.run shuts the default executor down), so the .part's size is final when it returns.
    before = run(cut())
    size = part.stat().st_size
    assert before > 0
    reads = run(resume())
    assert 0 < size < (signed_dir(data) / "2" / "model.onnx").stat().st_size * 2
    assert reads[0] == size  # the first RELEASE_GET after the restart asks from the .part's size
    assert sorted(set(reads)) == list(range(size, reads[-1] + 1, chunk))
    assert answer(data, 2)["status"] == "accepted"  # type: ignore[index]
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    assert store.verify_stored(2).release == 2 and not part.exists()


def test_older_release_not_downloaded_and_refused_as_downgrade(tmp_path: Path, signed: Any) -> None:
    key, r2, r3, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit)
    sorter.store.stage(r3, None)  # release 3 accepted (not active): 2 is a downgrade here

    async def go() -> list[int]:
        trainer = Trainer(ks, data)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None)
        client.stop()
        await task
        await trainer.stop()
        return trainer.shelf.reads

    assert run(go()) == []  # not one byte asked for
    got = answer(data, 2)
    assert got is not None and got["status"] == "refused" and got["check"] == "downgrade"
    assert sorter.store.releases() == [3] and not list((tmp_path / "models" / "staging").iterdir())


def test_oversized_offer_refused_without_download(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    sorter = Sorter(tmp_path / "models", key, kit, max_bytes=1_000_000)

    async def go() -> list[int]:
        trainer = Trainer(ks, data)
        await trainer.start()
        client = client_for(ks, trainer.server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: answer(data, 2) is not None)
        client.stop()
        await task
        await trainer.stop()
        return trainer.shelf.reads

    assert run(go()) == []
    got = answer(data, 2)
    assert got is not None and got["status"] == "refused" and got["check"] == "oversized"
    assert "1000000" in got["detail"] and not list((tmp_path / "models" / "staging").iterdir())


def test_rollback_while_the_link_is_down_reported_when_it_comes_back(tmp_path: Path, signed: Any) -> None:
    key, r2, _, kit = signed
    ks, data = KeySet(tmp_path), tmp_path / "data"
    sorter = Sorter(tmp_path / "models", key, kit)
    # What the composition root hands ReleaseWatcher.on_rolled_back: the link is not running.
    rollback_reporter(sorter.reports)(2, "class mix distance 0.40 (bound 0.25)")
    # A restart in between: the queued report survives it.
    again = Sorter(tmp_path / "models", key, kit)
    assert [(r.release, r.status, r.check) for r in again.reports.pending()] == [(2, "rolled-back", "health")]

    until_answered(ks, data, again)
    got = answer(data, 2)
    assert got is not None and got["status"] == "rolled-back" and got["check"] == "health"
    assert "class mix" in got["detail"]
    assert ResultQueue(tmp_path / "models" / REPORTS).pending() == []  # removed once the trainer had it
    assert "r2 rolled-back (health: class mix distance" in status_table(data)


def test_result_without_a_trainer_ack_stays_queued(tmp_path: Path, signed: Any) -> None:
    """A trainer that keeps no ledger never ACKs a result: the sorter keeps it (and sends it again)."""
    key, _, _, kit = signed
    ks = KeySet(tmp_path)
    sorter = Sorter(tmp_path / "models", key, kit)
    rollback_reporter(sorter.reports)(2, "flagged rate 40% vs 10%")

    async def go() -> None:
        server = LinkServer("tcp://127.0.0.1:*", ks.trainer_public, ks.trainer_secret, ks.allowed, FakeInbox(),
                            log_every_s=0.0)
        await server.start()
        serving = asyncio.ensure_future(server.run())
        client = client_for(ks, server.endpoint, sorter)
        task = asyncio.ensure_future(client.run())
        await until(lambda: 2 in server.links.get(SORTER, None).release_results if SORTER in server.links else False)
        first = server.links[SORTER].release_results[2]
        # Sent again (a new message) once its ACK timeout passed: still unacknowledged, still queued.
        await until(lambda: server.links[SORTER].release_results[2] is not first)
        assert [r.release for r in sorter.reports.pending()] == [2]
        client.stop()
        await task
        server.close()
        await serving

    run(go())
    assert [r.release for r in sorter.reports.pending()] == [2]


def test_offer_refuses_a_bundle_that_fails_verification(tmp_path: Path, signed: Any) -> None:
    key, r2, _, _ = signed
    other = Ed25519PrivateKey.generate()
    with pytest.raises(Refused) as exc:
        offer_bundle(r2, tmp_path / "data", [other.public_key()])
    assert exc.value.check == "untrusted-key" and not (signed_dir(tmp_path / "data") / "2").exists()


def test_shelf_reads_are_bounded_and_out_of_range_refused(tmp_path: Path, signed: Any) -> None:
    key, r2, _, _ = signed
    data = tmp_path / "data"
    offer_bundle(r2, data, [key.public_key()])
    shelf = OfferShelf(signed_dir(data))
    shelf.refresh()
    offer = shelf.newest()
    assert offer is not None and [f.name for f in offer.files][:2] == ["manifest.json", "manifest.sig"]
    stream = b"".join((signed_dir(data) / "2" / f.name).read_bytes() for f in offer.files)
    assert len(stream) == offer.total_bytes
    for off in (0, 1000, offer.total_bytes - 10):
        assert shelf.read(2, off, wire.MAX_CHUNK_BYTES) == stream[off:off + wire.MAX_CHUNK_BYTES]
    for release, off, length in ((2, offer.total_bytes, 1), (2, 0, wire.MAX_CHUNK_BYTES + 1), (9, 0, 10)):
        with pytest.raises(ValueError, match="offset|not offered"):
            shelf.read(release, off, length)


def test_hello_release_field_is_optional_and_strict() -> None:
    old = wire.encode(wire.Hello("sorterd 0.1.0", 0, 0))
    assert b"release" not in old[2] and wire.decode_from_sorter(old) == wire.Hello("sorterd 0.1.0", 0, 0, None)
    new = wire.encode(wire.Ping(1, 2, 7))
    assert wire.decode_from_sorter(new) == wire.Ping(1, 2, 7)
    bad = [new[0], new[1], json.dumps({"schema": 1, "outbox_entries": 1, "outbox_bytes": 2, "release": -1}).encode()]
    with pytest.raises(wire.WireError, match="release = -1"):
        wire.decode_from_sorter(bad)
