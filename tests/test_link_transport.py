"""The link over real sockets on loopback: who gets in (nobody unknown), and nothing lost or doubled.

Ephemeral ports everywhere (tcp://127.0.0.1:*, LAST_ENDPOINT), short heartbeats, and waits on
conditions with generous deadlines (the machine may be loaded), never fixed sleeps that assert.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from linkfakes import FakeInbox, FakeOutbox, KeySet, session, stone

from sorterd.link import wire
from sorterd.link.client import ClientOptions, LinkClient, LinkCollector
from sorterd.link.server import LinkServer, router_socket

FAST = dict(heartbeat_s=0.1, ack_timeout_s=0.5, reconnect_max_s=0.4)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def server_for(ks: KeySet, inbox: FakeInbox, endpoint: str = "tcp://127.0.0.1:*") -> LinkServer:
    return LinkServer(endpoint, ks.trainer_public, ks.trainer_secret, ks.allowed, inbox, log_every_s=0.0)


def options(ks: KeySet, endpoint: str, **kw: Any) -> ClientOptions:
    return ClientOptions(endpoint, ks.trainer_public, ks.sorter_public, ks.sorter_secret, **{**FAST, **kw})


def test_round_trip_every_record_acked_exactly_once(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)
    records = [stone(n) for n in range(40)] + [session()]

    async def go() -> None:
        inbox = FakeInbox()
        srv = server_for(ks, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox(records)
        client = LinkClient(options(ks, srv.endpoint, window=4), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: not outbox.waiting and client.in_flight == 0)
        assert client.stats.connected and srv.sorters()["sorter-a"][0]
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert set(inbox.kept) == {r.key for r in records}
        assert all(sorter == "sorter-a" and rec == next(r for r in records if r.key == k)
                   for k, (sorter, rec) in inbox.kept.items())  # images and fields arrive intact
        assert set(outbox.acks) == set(inbox.kept) and max(outbox.acks.values()) == 1
        assert client.stats.acked == len(records) == client.stats.sent
        assert inbox.seen["sorter-a"] >= 1 and threading.get_ident() not in inbox.threads
        assert len(inbox.threads) == 1  # one worker thread
        families = {m.name: m.samples[0].value for m in LinkCollector(client).collect()}
        assert families["sorterd_link_acked"] == len(records) and families["sorterd_link_connected"] == 0

    run(go())


class DropFirstAck(LinkServer):
    """A trainer whose first ACK is lost on the way."""

    dropped = 0

    def _reply(self, peer: Any, msg: wire.Message) -> None:
        if isinstance(msg, wire.Ack) and not self.dropped:
            self.dropped += 1
            return
        super()._reply(peer, msg)


def test_a_lost_ack_is_resent_and_stored_once(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        inbox = FakeInbox()
        srv = DropFirstAck("tcp://127.0.0.1:*", ks.trainer_public, ks.trainer_secret, ks.allowed, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox([stone(1), stone(2)])
        client = LinkClient(options(ks, srv.endpoint), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: not outbox.waiting)
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert srv.dropped == 1 and client.stats.resent >= 1
        assert len(inbox.kept) == 2 and sum(inbox.calls.values()) >= 3  # the resend reached the inbox...
        assert srv.stats.stored == 2 and srv.stats.duplicates >= 1  # ...and was stored once
        assert max(outbox.acks.values()) == 1 and client.stats.acked == 2

    run(go())


def test_disk_full_nack_retry_then_stored(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        inbox = FakeInbox()
        inbox.unavailable_for = 2
        srv = server_for(ks, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox([stone(1)])
        client = LinkClient(options(ks, srv.endpoint, ack_timeout_s=0.2), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: not outbox.waiting)
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert client.stats.nacked == 2 and client.stats.acked == 1 and not outbox.refusals
        assert list(inbox.kept) == [stone(1).key]

    run(go())


def test_a_record_of_another_sorter_is_refused_for_good(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        inbox = FakeInbox()
        srv = server_for(ks, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox([stone(1, sorter="sorter-b"), stone(2)])
        client = LinkClient(options(ks, srv.endpoint), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: not outbox.waiting)
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert list(inbox.kept) == [stone(2).key]
        [(key, reason)] = outbox.refusals.items()
        assert key == stone(1, sorter="sorter-b").key and "not the authenticated sorter 'sorter-a'" in reason

    run(go())


def test_trainer_down_then_up_reconnects_and_delivers_all(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        # an address that is free: bind, read it, close (then nobody listens there for a while)
        ctx = zmq.Context()
        probe = ctx.socket(zmq.ROUTER)
        probe.bind("tcp://127.0.0.1:*")
        endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
        probe.close(0)
        ctx.term()
        outbox = FakeOutbox([stone(n) for n in range(10)])
        client = LinkClient(options(ks, endpoint), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: client.stats.reconnects >= 2)  # the trainer is off: it keeps trying
        assert not client.stats.connected and client.stats.acked == 0 and len(outbox.waiting) == 10
        assert client.in_flight == 0  # nothing is sent before a WELCOME
        inbox = FakeInbox()
        srv = server_for(ks, inbox, endpoint)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        await until(lambda: not outbox.waiting)
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert len(inbox.kept) == 10 and client.stats.acked == 10 and max(outbox.acks.values()) == 1

    run(go())


def test_trainer_lost_mid_stream_then_back(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        inbox = FakeInbox()
        srv = server_for(ks, inbox)
        await srv.start()
        endpoint = srv.endpoint
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox([stone(1)])
        client = LinkClient(options(ks, endpoint), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: not outbox.waiting)
        srv.close()
        await serving
        await until(lambda: not client.stats.connected)  # 3 silent heartbeats
        with outbox.lock:
            outbox.waiting.update({r.key: r for r in (stone(2), stone(3))})
        srv2 = server_for(ks, inbox, endpoint)
        await srv2.start()
        serving = asyncio.ensure_future(srv2.run())
        await until(lambda: not outbox.waiting and client.stats.connected)
        client.stop()
        await asyncio.wait_for(task, 2)
        srv2.close()
        await serving
        assert len(inbox.kept) == 3 and max(outbox.acks.values()) == 1

    run(go())


def test_stop_with_the_trainer_down_returns_within_a_second(tmp_path: Path) -> None:
    ks = KeySet(tmp_path)

    async def go() -> None:
        outbox = FakeOutbox([stone(n) for n in range(3)])
        client = LinkClient(ClientOptions("tcp://127.0.0.1:9", ks.trainer_public, ks.sorter_public,
                                          ks.sorter_secret, heartbeat_s=5.0, reconnect_max_s=30.0), outbox)
        task = asyncio.ensure_future(client.run())
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        client.stop()
        await asyncio.wait_for(task, 1.0)
        assert time.monotonic() - t0 < 1.0 and len(outbox.waiting) == 3

    run(go())


# -- who gets in ------------------------------------------------------------------------------


async def _rogue(endpoint: str, setup: Callable[[zmq.asyncio.Socket], None], wait_s: float = 1.0) -> int:
    """A client that keeps trying for wait_s; how many replies it got."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    setup(sock)
    sock.connect(endpoint)
    got = 0
    end = time.monotonic() + wait_s
    hello = wire.encode(wire.Hello("rogue", 0, 0))
    record = wire.encode(stone(1))
    while time.monotonic() < end:
        for frames in (hello, record):
            wire.send_now(sock, frames)
        if await sock.poll(100):
            await sock.recv_multipart()
            got += 1
    sock.close(0)
    ctx.destroy(0)
    return got


def _curve(server_key: bytes, pair: tuple[bytes, bytes] | None = None) -> Callable[[zmq.asyncio.Socket], None]:
    public, secret = pair or zmq.curve_keypair()

    def setup(sock: zmq.asyncio.Socket) -> None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
    return setup


def _plain(sock: zmq.asyncio.Socket) -> None:
    sock.plain_username, sock.plain_password = b"sorter-a", b"guess"


def _null(sock: zmq.asyncio.Socket) -> None:
    pass


@pytest.mark.parametrize("who", ["null", "plain", "unknown-key-wrong-server", "right-server-key-not-allowed"])
def test_rogue_clients_get_nothing_in_and_are_logged(tmp_path: Path, who: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ks = KeySet(tmp_path)
    setups = {"null": _null, "plain": _plain, "unknown-key-wrong-server": _curve(zmq.curve_keypair()[0]),
              "right-server-key-not-allowed": _curve(ks.trainer_public)}

    async def go() -> None:
        inbox = FakeInbox()
        srv = server_for(ks, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        with caplog.at_level(logging.WARNING, logger="sorterd.link.server"):
            replies = await _rogue(srv.endpoint, setups[who])
            await until(lambda: srv.stats.refused >= 1)
        srv.close()
        await serving
        assert replies == 0 and srv.stats.accepted == 0 and not inbox.kept and not inbox.seen and not srv.links
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) >= 1 and all("\n" not in r.getMessage() for r in refusals)
        if who == "right-server-key-not-allowed":
            assert srv.stats.refused_keys >= 1 and any("not on the allow-list" in r.getMessage() for r in refusals)

    run(go())


def test_an_allowed_client_is_counted_accepted(tmp_path: Path) -> None:
    """The rogue test's control: the same probe with the allowed key pair gets answers."""
    ks = KeySet(tmp_path)

    async def go() -> None:
        srv = server_for(ks, FakeInbox())
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        replies = await _rogue(srv.endpoint, _curve(ks.trainer_public, (ks.sorter_public, ks.sorter_secret)))
        srv.close()
        await serving
        assert replies >= 2 and srv.stats.accepted >= 1 and srv.stats.refused == 0

    run(go())


def test_without_a_zap_handler_nobody_gets_in(tmp_path: Path) -> None:
    """Fail closed: the server's own socket setup, with no ZAP handler on its context."""
    ks = KeySet(tmp_path)

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        sock = router_socket(ctx, "tcp://127.0.0.1:*", ks.trainer_public, ks.trainer_secret)
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        replies = await _rogue(endpoint, _curve(ks.trainer_public, (ks.sorter_public, ks.sorter_secret)))
        got = await sock.poll(200)
        sock.close(0)
        ctx.destroy(0)
        assert replies == 0 and got == 0  # the allowed sorter's messages never reached the ROUTER

    run(go())


def test_a_sorter_whose_id_the_trainer_knows_otherwise_sends_nothing_and_keeps_all(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """link.sorter_id 'sorter-x' but the trainer's allow-list names the key 'sorter-a': every record
    would be refused for good; the client sends none, keeps them all, and says what to rename."""
    ks = KeySet(tmp_path)

    async def go() -> None:
        inbox = FakeInbox()
        srv = server_for(ks, inbox)
        await srv.start()
        serving = asyncio.ensure_future(srv.run())
        outbox = FakeOutbox([stone(1, sorter="sorter-x"), stone(2, sorter="sorter-x")])
        client = LinkClient(options(ks, srv.endpoint, sorter_id="sorter-x", heartbeat_s=0.2), outbox)
        task = asyncio.ensure_future(client.run())
        await until(lambda: client.stats.identity_mismatch == "sorter-a")
        await asyncio.sleep(0.6)  # a few heartbeats: still nothing sent
        client.stop()
        await asyncio.wait_for(task, 2)
        srv.close()
        await serving
        assert client.stats.sent == 0 and not outbox.refusals and len(outbox.waiting) == 2 and not inbox.kept

    with caplog.at_level(logging.ERROR, logger="sorterd.link.client"):
        run(go())
    assert any("knows this sorter's key as 'sorter-a'" in r.getMessage() and "sorter-x.key" in r.getMessage()
               for r in caplog.records)
