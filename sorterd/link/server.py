"""The trainer's side of the link: a CurveZMQ ROUTER that lets only allowed sorters in (§5.1).

Security (fail closed):

* the ROUTER is a CURVE server (`curve_server`), so NULL and PLAIN peers fail the handshake;
* a ZAP handler on the SAME context (pyzmq's `AsyncioAuthenticator`, with a callback over the
  allow-list directory) accepts a CURVE client only if its public key is a ``*.key`` file there;
  the file's stem is the sorter id, returned as the ZAP User-Id and read back from every
  message's ``User-Id`` frame property -- never taken from a field the sorter sends;
* ``zap_domain`` is set and ``ZAP_ENFORCE_DOMAIN=1``: without a ZAP handler no one gets in;
* every refused handshake (socket monitor) and every refused key (ZAP) is counted and logged,
  at most one line per `log_every_s` per kind (a rogue peer retrying cannot flood the log).

Signed releases (issue 12 item 3), when the server is given a `ReleaseShelf` and a `ReleaseLedger`
(`sorterd.trainer.releases`): a HELLO or PING whose `release` is below the shelf's newest, from a
sorter that has not answered for that release, gets a RELEASE_OFFER (on HELLO, then at most once
per `offer_every_s`); each RELEASE_GET is answered with one RELEASE_CHUNK read in the release
thread (bounded: ≤ 256 KiB, never the whole release), an out-of-range one with NACK (key null,
reason "RELEASE_GET <N>: ..."); each RELEASE_RESULT is written to the ledger (atomic rename) and
only then ACKed as `[sorter, "release", "<N>.<status>"]`.

Records: parsed strictly (`sorterd.link.wire`); the inbox's `store` runs in ONE worker thread,
never on the loop; "stored"/"duplicate" → ACK, "unavailable" → NACK retry=true, "refused" or a
malformed message → NACK retry=false with the reason.  At most `max_inflight` records are held
in memory (the receive loop waits: backpressure through TCP), `close()` never waits on a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from sorterd.link import wire
from sorterd.link.keys import load_allowed
from sorterd.link.records import InboxSink, Record, Stored

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sorterd-link"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5591"
_REFUSED_EVENTS: dict[int, str] = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                   zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error (wrong mechanism, NULL/PLAIN peer, or the "
                                                        "wrong server key)",
                   zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (key not allowed)"}


class RateLimitedLog:
    """Warnings at most once per `every_s` per kind, with how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if kind in self._last and now - self._last[kind] < self.every_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        left_out = self._quiet.pop(kind, 0)
        self._last[kind] = now
        self.logger.warning("%s%s", text, f" ({left_out} more like it not logged)" if left_out else "")


def router_socket(ctx: zmq.asyncio.Context, endpoint: str, public_key: bytes, secret_key: bytes) -> zmq.asyncio.Socket:
    """The trainer's ROUTER, bound: CURVE server, ZAP domain enforced (no handler → no peer), bounded."""
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public_key, secret_key
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)  # per frame: a bigger one drops the peer
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock


class _AllowList(AsyncioAuthenticator):
    """pyzmq's ZAP handler with CURVE keys checked against the allow-list; User-Id = the sorter id."""

    def __init__(self, ctx: zmq.asyncio.Context, allowed: dict[bytes, str], refused: RateLimitedLog,
                 stats: ServerStats) -> None:
        super().__init__(ctx, log=logging.getLogger(__name__ + ".zap"))
        self.allowed, self.refused, self.stats = allowed, refused, stats
        self.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        if domain == ZAP_DOMAIN and key in self.allowed:
            return True
        self.stats.refused_keys += 1
        self.refused.warning("zap-key", f"link: refused a CURVE client with a key not on the allow-list "
                                        f"({key.decode(errors='replace')}, domain {domain!r})")
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowed[z85.encode(client_public_key)]

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and msg[5] != b"CURVE":  # never reached on a curve_server socket; refused anyway
            self.stats.refused_keys += 1
            self.refused.warning("zap-mech", f"link: refused a {msg[5][:10]!r} peer: CURVE only")
            self._send_zap_reply(msg[1], b"400", b"CURVE only")
            return
        await super().handle_zap_message(msg)


class ReleaseShelf(Protocol):
    """The releases the trainer offers (`sorterd.trainer.releases.OfferShelf`)."""

    def refresh(self) -> None:
        """Rescan what is offered (blocking: the release thread)."""
        ...

    def newest(self) -> wire.ReleaseOffer | None:
        """The offer of the newest release (memory: the loop)."""
        ...

    def read(self, release: int, offset: int, length: int) -> bytes:
        """Bytes of the release's stream from offset, at most length (blocking); ValueError out of range."""
        ...


class ReleaseLedger(Protocol):
    """What each sorter said of the releases (`sorterd.trainer.releases.ReleaseBook`); writers are
    blocking (the release thread), `answered` reads memory (the loop)."""

    def answered(self, sorter: str, release: int) -> bool: ...

    def running(self, sorter: str, release: int) -> None: ...

    def offered(self, sorter: str, release: int) -> None: ...

    def result(self, sorter: str, result: wire.ReleaseResult) -> None: ...


@dataclass
class ServerStats:
    """Counters kept on the event loop's thread (a scrape reads plain ints)."""

    accepted: int = 0  # handshakes that succeeded (allowed sorters)
    refused: int = 0  # handshakes that failed (socket monitor): NULL/PLAIN, wrong server key, refused key
    refused_keys: int = 0  # ZAP refusals of keys not on the allow-list
    stored: int = 0
    duplicates: int = 0
    nacked: int = 0  # NACKs sent (retry or not)
    malformed: int = 0  # messages refused by the parser
    offers: int = 0  # RELEASE_OFFERs sent
    chunks: int = 0  # RELEASE_CHUNKs sent


@dataclass
class SorterLink:
    """What the trainer knows of one sorter's connection (loop thread)."""

    last_seen: float = 0.0  # time.monotonic() of its last message
    outbox_entries: int = 0
    outbox_bytes: int = 0
    messages: int = 0
    software: str = ""
    release_results: dict[int, wire.ReleaseResult] = field(default_factory=dict)  # the last word on each release


@dataclass
class _Peer:
    routing_id: bytes
    sorter_id: str
    address: str = field(default="")


class LinkServer:
    """The trainer's ROUTER: `await start()` binds (then `endpoint` is the bound address), `await run()`
    serves until `close()`."""

    def __init__(self, endpoint: str, public_key: bytes, secret_key: bytes, allowed_dir: Path, sink: InboxSink, *,
                 max_inflight: int = 32, log_every_s: float = 10.0, silence_s: float = 10.0,
                 shelf: ReleaseShelf | None = None, ledger: ReleaseLedger | None = None,
                 offer_every_s: float = 10.0, shelf_poll_s: float = 5.0) -> None:
        self.requested = endpoint
        self.public_key, self.secret_key = public_key, secret_key
        self.allowed_dir, self.sink = allowed_dir, sink
        self.max_inflight, self.silence_s = max_inflight, silence_s
        self.stats = ServerStats()
        self.links: dict[str, SorterLink] = {}
        self._refused = RateLimitedLog(log, log_every_s)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._auth: _AllowList | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="link-inbox")  # the one inbox thread
        # Release reads and the ledger's writes: one thread of their own (a chunk never waits on a store).
        self.shelf, self.ledger = shelf, ledger
        self.offer_every_s, self.shelf_poll_s = offer_every_s, shelf_poll_s
        self._release_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="link-release")
        self._last_offer: dict[str, tuple[int, float]] = {}  # sorter -> (release, monotonic time) last offered
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        self.endpoint = ""

    async def start(self) -> None:
        allowed, problems = load_allowed(self.allowed_dir)
        for p in problems:
            log.warning("link: allow-list: %s", p)
        log.info("link: %d sorters allowed (%s)", len(allowed), ", ".join(sorted(allowed.values())) or "none")
        self._ctx = zmq.asyncio.Context()
        self._auth = _AllowList(self._ctx, allowed, self._refused, self.stats)
        self._auth.start()  # bound on this context before the ROUTER accepts anyone
        self._sock = router_socket(self._ctx, self.requested, self.public_key, self.secret_key)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._spawn(self._watch_handshakes())
        if self.shelf is not None:
            await self._in_release_worker(self.shelf.refresh)  # the shelf is known before the first HELLO
            self._spawn(self._watch_shelf())

    async def run(self) -> None:
        if self._sock is None:
            await self.start()
        receiver = self._spawn(self._receive())
        await self._closed.wait()
        receiver.cancel()

    def sorters(self) -> dict[str, tuple[bool, SorterLink]]:
        """sorter id -> (connected: heard from within silence_s, its state)."""
        now = time.monotonic()
        return {s: (now - st.last_seen < self.silence_s, st) for s, st in self.links.items()}

    def close(self) -> None:
        """Stop at once: no peer is waited for; a store in progress finishes in its thread, unacknowledged
        (its sorter sends it again and the inbox answers "duplicate")."""
        self._closed.set()
        for t in list(self._tasks):
            t.cancel()
        if self._auth is not None:
            self._auth.stop()
        for s in (self._monitor, self._sock):
            if s is not None:
                s.close(linger=0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._release_worker.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch_handshakes(self) -> None:
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.stats.accepted += 1
                continue
            self.stats.refused += 1
            why = _REFUSED_EVENTS.get(int(event["event"]), "handshake failed")
            self._refused.warning(f"handshake-{event['event']}", f"link: refused a connection on "
                                  f"{event['endpoint'].decode(errors='replace')}: {why} (value {event['value']})")

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            await self._slots.acquire()  # at most max_inflight records held in memory
            frames = await self._sock.recv_multipart(copy=False)
            try:
                self._handle(frames)
            except Exception:  # one message must never stop the server
                self._slots.release()
                log.exception("link: message handling failed")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        routing_id, parts = frames[0].bytes, frames[1:]
        sorter_id = parts[0].get("User-Id") if parts else ""
        peer = _Peer(routing_id, str(sorter_id))
        if not peer.sorter_id or peer.sorter_id == "anonymous":  # ZAP let no one else in; never trusted anyway
            self._slots.release()
            self._refused.warning("no-user", "link: a message without an authenticated sorter id was dropped")
            return
        raw = [p.bytes for p in parts]
        try:
            msg = wire.decode_from_sorter(raw)
        except wire.WireError as exc:
            self._slots.release()
            self.stats.malformed += 1
            self._refused.warning(f"malformed-{peer.sorter_id}", f"link: {peer.sorter_id}: refused a message: {exc}")
            self._reply(peer, wire.Nack(wire.record_key(raw), str(exc), retry=False))
            return
        self._seen(peer.sorter_id)
        if isinstance(msg, wire.Hello | wire.Ping):
            self._slots.release()
            self._heartbeat(peer, msg)
        elif isinstance(msg, wire.ReleaseResult):
            self._slots.release()
            self.links[peer.sorter_id].release_results[msg.release] = msg
            log.info("link: %s: release %d %s%s", peer.sorter_id, msg.release, msg.status,
                     f" ({msg.check}: {msg.detail})" if msg.check else "")
            self._spawn(self._record_result(peer, msg))
        elif isinstance(msg, wire.ReleaseGet):
            self._spawn(self._serve_chunk(peer, msg))  # holds a slot: at most max_inflight chunks in memory
        else:
            self._spawn(self._store(peer, msg))

    def _seen(self, sorter_id: str) -> SorterLink:
        st = self.links.setdefault(sorter_id, SorterLink())
        st.last_seen, st.messages = time.monotonic(), st.messages + 1
        return st

    def _heartbeat(self, peer: _Peer, msg: wire.Hello | wire.Ping) -> None:
        st = self.links[peer.sorter_id]
        st.outbox_entries, st.outbox_bytes = msg.outbox_entries, msg.outbox_bytes
        if isinstance(msg, wire.Hello):
            st.software = msg.software
            log.info("link: %s connected (%s, outbox %d entries)", peer.sorter_id, msg.software, msg.outbox_entries)
            self._reply(peer, wire.Welcome(peer.sorter_id, wire.MAX_MESSAGE_BYTES))
            self._last_offer.pop(peer.sorter_id, None)  # a (re)connected sorter hears the offer at once
        else:
            self._reply(peer, wire.Pong())
        self._spawn(self._in_worker(self.sink.sorter_seen, peer.sorter_id, msg.outbox_entries, msg.outbox_bytes))
        if msg.release is not None:
            self._maybe_offer(peer, msg.release)

    # -- signed releases ---------------------------------------------------------------------

    def _maybe_offer(self, peer: _Peer, running: int) -> None:
        """Offer the newest release to a sorter that runs an older one and has not answered for it."""
        if self.ledger is not None:
            self._spawn(self._in_release_worker(self.ledger.running, peer.sorter_id, running))
        offer = self.shelf.newest() if self.shelf is not None else None
        if offer is None or self.ledger is None or offer.release <= running:
            return
        if self.ledger.answered(peer.sorter_id, offer.release):
            return
        last = self._last_offer.get(peer.sorter_id)
        now = time.monotonic()
        if last is not None and last[0] == offer.release and now - last[1] < self.offer_every_s:
            return
        self._last_offer[peer.sorter_id] = (offer.release, now)
        self.stats.offers += 1
        self._reply(peer, offer)
        self._spawn(self._in_release_worker(self.ledger.offered, peer.sorter_id, offer.release))

    async def _serve_chunk(self, peer: _Peer, get: wire.ReleaseGet) -> None:
        try:
            await self._chunk_for(peer, get)
        finally:
            self._slots.release()

    async def _chunk_for(self, peer: _Peer, get: wire.ReleaseGet) -> None:
        if self.shelf is None:
            self._reply(peer, wire.Nack(None, f"RELEASE_GET {get.release}: this trainer offers no release", retry=False))
            return
        try:
            data = await asyncio.get_running_loop().run_in_executor(self._release_worker, self.shelf.read,
                                                                    get.release, get.offset, get.length)
        except (ValueError, OSError) as exc:
            self._refused.warning(f"release-get-{peer.sorter_id}", f"link: {peer.sorter_id}: RELEASE_GET "
                                  f"{get.release} @ {get.offset}+{get.length} refused: {exc}")
            self._reply(peer, wire.Nack(None, f"RELEASE_GET {get.release}: {exc}", retry=False))
            return
        self.stats.chunks += 1
        self._reply(peer, wire.ReleaseChunk(get.release, get.offset, data))

    async def _record_result(self, peer: _Peer, result: wire.ReleaseResult) -> None:
        """On the ledger's disk first, then ACKed (the sorter keeps it until then)."""
        if self.ledger is None:
            return  # nowhere to keep it: not ACKed (the sorter sends it again)
        try:
            await asyncio.get_running_loop().run_in_executor(self._release_worker, self.ledger.result,
                                                             peer.sorter_id, result)
        except OSError:
            log.exception("link: %s: release %d's result could not be written", peer.sorter_id, result.release)
            return
        self._reply(peer, wire.Ack(wire.result_key(peer.sorter_id, result), "stored"))

    async def _in_release_worker(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._release_worker, fn, *args)
        except Exception:
            log.exception("link: the release ledger failed in %s", getattr(fn, "__name__", fn))
            return None

    async def _watch_shelf(self) -> None:
        assert self.shelf is not None
        while True:
            await asyncio.sleep(self.shelf_poll_s)
            await self._in_release_worker(self.shelf.refresh)

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        except Exception:
            log.exception("link: the inbox failed in %s", getattr(fn, "__name__", fn))
            return None

    async def _store(self, peer: _Peer, record: Record) -> None:
        try:
            if record.sorter_id != peer.sorter_id:
                self._nack(peer, record, f"sorter_id {record.sorter_id!r} is not the authenticated sorter "
                                         f"{peer.sorter_id!r}; a sorter sends only its own records", retry=False)
                return
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._worker, self.sink.store,
                                                                          peer.sorter_id, record)
            except Exception as exc:  # the inbox broke: the record is not on disk, the sorter keeps it
                log.exception("link: %s: the inbox failed storing %s", peer.sorter_id, record.key)
                result = Stored("unavailable", f"inbox error: {type(exc).__name__}: {exc}")
            self._answer(peer, record, result)
        finally:
            self._slots.release()

    def _answer(self, peer: _Peer, record: Record, result: Stored) -> None:
        if result.status in ("stored", "duplicate"):
            if result.status == "stored":
                self.stats.stored += 1
            else:
                self.stats.duplicates += 1
            self._reply(peer, wire.Ack(record.key, result.status))
        elif result.status == "unavailable":
            self._nack(peer, record, result.reason or "the inbox cannot store now", retry=True)
        else:
            self._nack(peer, record, result.reason or "refused by the inbox", retry=False)

    def _nack(self, peer: _Peer, record: Record, reason: str, *, retry: bool) -> None:
        self._refused.warning(f"nack-{peer.sorter_id}-{retry}", f"link: {peer.sorter_id}: {record.key} not stored "
                              f"({'will retry' if retry else 'for good'}): {reason}")
        self._reply(peer, wire.Nack(record.key, reason, retry=retry))

    def _reply(self, peer: _Peer, msg: wire.Message) -> None:
        if isinstance(msg, wire.Nack):
            self.stats.nacked += 1
        if self._sock is None or self._closed.is_set():
            return
        with contextlib.suppress(zmq.ZMQError):  # the peer went away (or its queue is full): it resends
            wire.send_now(self._sock, [peer.routing_id, *wire.encode(msg)])


class ServerCollector:
    """The server's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, server: LinkServer) -> None:
        self.server = server

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        s = self.server.stats
        for name, value, text in (("accepted", s.accepted, "Sorter connections that passed the CURVE handshake."),
                                  ("refused", s.refused, "Connections refused (NULL/PLAIN, wrong key, not allowed)."),
                                  ("stored", s.stored, "Records the inbox stored (ACKed)."),
                                  ("duplicates", s.duplicates, "Records sent again and already stored (ACKed)."),
                                  ("nacked", s.nacked, "NACKs sent."),
                                  ("malformed", s.malformed, "Messages the parser refused."),
                                  ("release_offers", s.offers, "RELEASE_OFFERs sent to sorters."),
                                  ("release_chunks", s.chunks, "RELEASE_CHUNKs sent to sorters.")):
            yield CounterMetricFamily(f"sorterd_trainer_link_{name}", text, value=float(value))
        connected = GaugeMetricFamily("sorterd_trainer_link_sorter_connected", "1 while a sorter is heard from.",
                                      labels=["sorter"])
        for sorter, (up, _) in self.server.sorters().items():
            connected.add_metric([sorter], float(up))
        yield connected
