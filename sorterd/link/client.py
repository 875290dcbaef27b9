"""The sorter's side of the link: flagged stones from the outbox to the trainer (§5.1), reliably.

zguide's Paranoid Pirate, adapted: one DEALER (CurveZMQ client: this sorter's key pair, the
trainer's public key), and

* on every (re)connect a HELLO, repeated each heartbeat until the trainer's WELCOME;
* up to `window` records in flight, pulled from the outbox in a thread (it may block on disk),
  each encoded and checked in that thread too; a record is removed from the outbox only when
  its ACK arrives (the trainer ACKs after its fsync: Titanic's "disk before ack");
* no ACK within `ack_timeout_s` → sent again; NACK retry=true → sent again after `ack_timeout_s`;
  NACK retry=false → `outbox.refused` (kept aside there, counted);
* a PING each `heartbeat_s` with the outbox depth; 3 heartbeats without a word from the trainer
  → it is lost: the socket is closed (LINGER 0: nothing waits on a dead peer) and a new one
  connects after an exponential backoff (heartbeat_s doubling, at most `reconnect_max_s`);
  records in flight stay in flight and are sent again once the new connection is welcomed.

Signed releases (issue 12 item 3; `PROTOCOL.md`), when the client is given a `ReleaseSide`:
HELLO/PING carry the release the sorter runs; a RELEASE_OFFER is handed to it (in a thread: it
decides -- floor, refused before, size limit -- and says where to resume), then ONE RELEASE_GET at
a time of at most `release_chunk_bytes`, each RELEASE_CHUNK appended and fsynced in a thread
before the next is asked for (sent again after `ack_timeout_s` without an answer, and after a
reconnect); the whole download is staged in a background thread (verification and the QA gate
take seconds: heartbeats go on).  Results (accepted, refused, rolled-back) wait on the sorter's
disk until the trainer ACKs them (`wire.result_key`), sent again after each reconnect.

Memory is bounded by `window` whatever the trainer does (the trainer's replies are headers, or
one release chunk: ZMQ_MAXMSGSIZE is `wire.MAX_SORTER_FRAME_BYTES`).  `stop()` returns at once; `run()` ends promptly,
never waiting on a dead trainer or a slow outbox call (whose result is then dropped: the outbox
keeps the record).  Counters live on the loop's thread; `LinkCollector` exposes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sorterd import __version__
from sorterd.link import wire
from sorterd.link.records import OutboxSource, RecordKey

log = logging.getLogger(__name__)
T = TypeVar("T")
LIVENESS = 3  # heartbeats without a word from the trainer before it is declared lost


@dataclass(frozen=True)
class ClientOptions:
    """How the sorter reaches its trainer (the composition root maps `[link]` onto this).
    Keys are Z85 (as `sorterd.link.keys` loads them)."""

    endpoint: str
    server_public_key: bytes
    public_key: bytes
    secret_key: bytes
    window: int = 16
    heartbeat_s: float = 1.0
    ack_timeout_s: float = 10.0
    reconnect_max_s: float = 30.0
    software: str = f"sorterd {__version__}"
    idle_poll_s: float = 0.25  # how soon to ask an empty outbox again
    sorter_id: str = ""  # the id this sorter's records carry; the trainer must know its key by it ("": unchecked)
    release_chunk_bytes: int = wire.MAX_CHUNK_BYTES  # one RELEASE_GET's length

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "ack_timeout_s", "reconnect_max_s", "idle_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ClientOptions.{name} = {getattr(self, name)!r}: must be > 0")
        if not 1 <= self.window <= 1024:
            raise ValueError(f"ClientOptions.window = {self.window!r}: must be in [1, 1024]")
        if not 1 <= self.release_chunk_bytes <= wire.MAX_CHUNK_BYTES:
            raise ValueError(f"ClientOptions.release_chunk_bytes = {self.release_chunk_bytes!r}: must be in "
                             f"[1, {wire.MAX_CHUNK_BYTES}]")


class ReleaseSide(Protocol):
    """What the client uses of the sorter's release store (`sorterd.release.download.Downloader`).
    Every method but `running` and `results` is blocking file work: the client calls it in a thread."""

    def running(self) -> int:
        """The release the sorter runs now (0: its configured bundle); cheap, called on the loop."""
        ...

    def offered(self, offer: wire.ReleaseOffer) -> int | None:
        """Take the offer: the stream offset to download from (total_bytes: already whole), or None
        (not taken: below the floor, refused before, too big -- a result may be queued)."""
        ...

    def received(self, chunk: wire.ReleaseChunk) -> int:
        """Append the asked-for chunk durably; the bytes now downloaded (total_bytes: whole)."""
        ...

    def finish(self, release: int) -> None:
        """Unpack, verify and stage the whole download; the outcome joins `results`."""
        ...

    def results(self) -> list[wire.ReleaseResult]:
        """The results not yet on the trainer's disk, oldest first; cheap (memory), called on the loop."""
        ...

    def reported(self, result: wire.ReleaseResult) -> None:
        """The trainer ACKed `result`: forget it (durably)."""
        ...


@dataclass
class ClientStats:
    """Counters, on the loop's thread."""

    sent: int = 0  # records sent the first time
    acked: int = 0  # records the trainer acknowledged (each once)
    resent: int = 0  # records sent again (ack timeout, NACK retry, reconnect)
    nacked: int = 0  # NACKs received (retry or not)
    refused: int = 0  # records refused for good (NACK retry=false, or unsendable)
    connected: bool = False  # welcomed by the trainer and not lost since
    reconnects: int = 0
    identity_mismatch: str = ""  # the id the trainer knows this key by, when it is not options.sorter_id


@dataclass
class _InFlight:
    frames: list[bytes]
    deadline: float  # when to send it again without an answer
    resends: int = field(default=0)


@dataclass
class _Download:
    """The release being downloaded: its offer and the one RELEASE_GET in flight."""

    offer: wire.ReleaseOffer
    offset: int
    length: int = 0
    deadline: float = 0.0


class _Stopped(Exception):
    pass


class LinkClient:
    """`await run()` until `stop()`."""

    def __init__(self, options: ClientOptions, outbox: OutboxSource, releases: ReleaseSide | None = None) -> None:
        self.options, self.outbox, self.releases = options, outbox, releases
        self.stats = ClientStats()
        self._inflight: dict[RecordKey, _InFlight] = {}
        self._stopping = asyncio.Event()
        self._outbox_empty_until = 0.0
        self._download: _Download | None = None
        self._finishing: asyncio.Future[None] | None = None  # staging a whole download (a thread)
        self._results_due: dict[tuple[int, str], float] = {}  # results sent, awaiting their ACK: when to resend

    def stop(self) -> None:
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self) -> None:
        o = self.options
        backoff = min(o.heartbeat_s, o.reconnect_max_s)
        ctx = zmq.asyncio.Context()
        try:
            while not self._stopping.is_set():
                sock = self._socket(ctx)
                try:
                    welcomed = await self._session(sock)
                except _Stopped:
                    break
                finally:
                    self.stats.connected = False
                    sock.close(linger=0)
                if welcomed:
                    backoff = min(o.heartbeat_s, o.reconnect_max_s)
                log.warning("link: trainer %s lost (%d records in flight); reconnecting in %.1f s", o.endpoint,
                            len(self._inflight), backoff)
                self.stats.reconnects += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, o.reconnect_max_s)
        finally:
            ctx.destroy(linger=0)

    # -- one connection ----------------------------------------------------------------------

    def _socket(self, ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
        o = self.options
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (o.server_public_key, o.public_key,
                                                                            o.secret_key)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a completed (authenticated) connection
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_SORTER_FRAME_BYTES)  # headers, or one release chunk: no more
        sock.setsockopt(zmq.RCVHWM, 4 * o.window + 16)
        sock.connect(o.endpoint)
        return sock

    async def _session(self, sock: zmq.asyncio.Socket) -> bool:
        """Talk to the trainer until it goes silent (returns whether it had welcomed us); _Stopped on stop()."""
        o = self.options
        heard = time.monotonic()
        next_beat = heard
        welcomed = False
        wake: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        recv: asyncio.Future[Any] = asyncio.ensure_future(sock.recv_multipart())
        try:
            while True:
                now = time.monotonic()
                if now - heard > LIVENESS * o.heartbeat_s:
                    return welcomed
                if now >= next_beat:
                    await self._beat(sock, welcomed)
                    next_beat = now + o.heartbeat_s
                if welcomed:
                    await self._fill(sock)
                    self._resend_due(sock)
                    self._release_due(sock)
                done, _ = await asyncio.wait({recv, wake}, timeout=self._wait_s(next_beat, welcomed),
                                             return_when=asyncio.FIRST_COMPLETED)
                if wake in done:
                    raise _Stopped
                if recv in done:
                    frames = recv.result()
                    recv = asyncio.ensure_future(sock.recv_multipart())
                    if await self._on_message(sock, frames, welcomed):
                        heard = time.monotonic()
                        welcomed = welcomed or self.stats.connected
        finally:
            recv.cancel()
            wake.cancel()

    def _wait_s(self, next_beat: float, welcomed: bool) -> float:
        until = [next_beat]
        if welcomed:
            until += [f.deadline for f in self._inflight.values()]
            if len(self._inflight) < self.options.window:
                until.append(self._outbox_empty_until)
            if self._download is not None and self._download.length:
                until.append(self._download.deadline)
            until += list(self._results_due.values())
        return max(0.0, min(until) - time.monotonic())

    async def _beat(self, sock: zmq.asyncio.Socket, welcomed: bool) -> None:
        entries, size = await self._off_loop(self.outbox.depth)
        running = self.releases.running() if self.releases is not None else None
        msg: wire.Message = (wire.Ping(entries, size, running) if welcomed
                             else wire.Hello(self.options.software[:100], entries, size, running))
        self._send(sock, wire.encode(msg))

    async def _fill(self, sock: zmq.asyncio.Socket) -> None:
        room = self.options.window - len(self._inflight)
        if room <= 0 or time.monotonic() < self._outbox_empty_until:
            return
        batch, unsendable = await self._off_loop(self._pull, room, frozenset(self._inflight))
        self.stats.refused += unsendable
        if not batch:
            self._outbox_empty_until = time.monotonic() + self.options.idle_poll_s
        for key, frames in batch:
            if key in self._inflight:
                continue
            self._inflight[key] = _InFlight(frames, time.monotonic() + self.options.ack_timeout_s)
            self.stats.sent += 1
            self._send(sock, frames)

    def _pull(self, limit: int, exclude: frozenset[RecordKey]) -> tuple[list[tuple[RecordKey, list[bytes]]], int]:
        """In a thread: the next records, encoded; one that cannot be encoded is refused for good (counted)."""
        out, unsendable = [], 0
        for record in self.outbox.pending(limit, exclude):
            try:
                out.append((record.key, wire.encode(record)))
            except wire.WireError as exc:
                log.error("link: record %s cannot be sent: %s", record.key, exc)
                self.outbox.refused(record.key, f"not sendable: {exc}")
                unsendable += 1
        return out, unsendable

    def _resend_due(self, sock: zmq.asyncio.Socket) -> None:
        now = time.monotonic()
        for f in self._inflight.values():
            if f.deadline <= now:
                self._resend(sock, f, now)

    def _resend(self, sock: zmq.asyncio.Socket, f: _InFlight, now: float) -> None:
        f.deadline, f.resends = now + self.options.ack_timeout_s, f.resends + 1
        self.stats.resent += 1
        self._send(sock, f.frames)

    def _send(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # False: no connection yet (IMMEDIATE): it is sent again on its deadline or the next heartbeat
        wire.send_now(sock, frames)

    async def _on_message(self, sock: zmq.asyncio.Socket, frames: list[bytes], welcomed: bool) -> bool:
        """Handle one reply; whether it was a valid message (it counts as the trainer being alive)."""
        try:
            msg = wire.decode_from_trainer(frames)
        except wire.WireError as exc:
            log.warning("link: ignored a message from the trainer: %s", exc)
            return False
        if isinstance(msg, wire.Welcome):
            self._welcomed(sock, msg)
        elif isinstance(msg, wire.Ack):
            await self._acked(msg.key)
        elif isinstance(msg, wire.Nack):
            await self._nacked(msg)
        elif isinstance(msg, wire.ReleaseOffer) and self.stats.connected:
            await self._offered(sock, msg)
        elif isinstance(msg, wire.ReleaseChunk) and self.stats.connected:
            await self._chunk(sock, msg)
        return True

    def _welcomed(self, sock: zmq.asyncio.Socket, msg: wire.Welcome) -> None:
        want = self.options.sorter_id
        if want and msg.sorter_id != want:
            # Every record would be refused for good (a sorter sends only its own): send nothing,
            # keep them all in the outbox, and say what to fix.
            if self.stats.identity_mismatch != msg.sorter_id:
                log.error("link: the trainer %s knows this sorter's key as %r, but its records carry %r "
                          "(link.sorter_id, else machine.name): nothing is sent until they agree -- rename the "
                          "key file in the trainer's --allowed directory to %s.key, or set link.sorter_id = %r",
                          self.options.endpoint, msg.sorter_id, want, want, msg.sorter_id)
            self.stats.identity_mismatch = msg.sorter_id
            return
        self.stats.identity_mismatch = ""
        if not self.stats.connected:
            log.info("link: connected to the trainer %s as %s", self.options.endpoint, msg.sorter_id)
        self.stats.connected = True
        now = time.monotonic()
        for f in self._inflight.values():  # unanswered on the last connection: send again now
            self._resend(sock, f, now)
        self._results_due.clear()  # unacknowledged results: sent again now
        if self._download is not None and self._download.length:
            self._ask(sock, self._download)

    async def _acked(self, key: RecordKey) -> None:
        if key[1] == wire.RESULT_BATCH and key not in self._inflight:
            await self._result_acked(key)
            return
        if key not in self._inflight:
            return  # a second ACK (after a resend): already done
        await self._off_loop(self.outbox.acknowledged, key)
        if self._inflight.pop(key, None) is not None:
            self.stats.acked += 1

    async def _nacked(self, msg: wire.Nack) -> None:
        self.stats.nacked += 1
        d = self._download
        if msg.key is None and d is not None and msg.reason.startswith(f"RELEASE_GET {d.offer.release}:"):
            log.error("link: the trainer cannot serve release %d any more (%s); the download stops (its part "
                      "stays for a later offer)", d.offer.release, msg.reason)
            self._download = None
            return
        if msg.key is None or msg.key not in self._inflight:
            log.warning("link: the trainer refused a message: %s", msg.reason)
            return
        if msg.retry:
            log.warning("link: the trainer cannot store %s now (%s); sending it again in %.0f s", msg.key,
                        msg.reason, self.options.ack_timeout_s)
            self._inflight[msg.key].deadline = time.monotonic() + self.options.ack_timeout_s
            return
        log.error("link: the trainer refused %s for good: %s", msg.key, msg.reason)
        await self._off_loop(self.outbox.refused, msg.key, msg.reason)
        if self._inflight.pop(msg.key, None) is not None:
            self.stats.refused += 1

    # -- signed releases ---------------------------------------------------------------------

    async def _offered(self, sock: zmq.asyncio.Socket, offer: wire.ReleaseOffer) -> None:
        if self.releases is None or (self._finishing is not None and not self._finishing.done()):
            return  # no store here, or one download is being staged: the offer comes again
        d = self._download
        if d is not None and d.offer == offer:
            return  # the offer repeated while its download goes on
        start = await self._off_loop(self.releases.offered, offer)
        if start is None:
            if d is not None and d.offer.release == offer.release:
                self._download = None
            return
        log.info("link: downloading release %d (%d bytes) from byte %d", offer.release, offer.total_bytes, start)
        self._download = _Download(offer, start)
        self._next(sock, self._download)

    async def _chunk(self, sock: zmq.asyncio.Socket, chunk: wire.ReleaseChunk) -> None:
        d = self._download
        if (self.releases is None or d is None or not d.length or chunk.release != d.offer.release
                or chunk.offset != d.offset or len(chunk.data) != d.length):
            log.debug("link: ignored a RELEASE_CHUNK not asked for (%d @ %d)", chunk.release, chunk.offset)
            return
        d.length = 0  # answered: nothing in flight while it is written
        d.offset = await self._off_loop(self.releases.received, chunk)
        if self._download is d:
            self._next(sock, d)

    def _next(self, sock: zmq.asyncio.Socket, d: _Download) -> None:
        """Ask for the next chunk, or stage the whole download (a background thread)."""
        left = d.offer.total_bytes - d.offset
        if left > 0:
            d.length = min(self.options.release_chunk_bytes, left)
            self._ask(sock, d)
            return
        self._download = None
        assert self.releases is not None
        log.info("link: release %d downloaded; verifying and staging it", d.offer.release)
        self._finishing = asyncio.ensure_future(asyncio.to_thread(self.releases.finish, d.offer.release))
        self._finishing.add_done_callback(_log_failure)

    def _ask(self, sock: zmq.asyncio.Socket, d: _Download) -> None:
        d.deadline = time.monotonic() + self.options.ack_timeout_s
        self._send(sock, wire.encode(wire.ReleaseGet(d.offer.release, d.offset, d.length)))

    def _release_due(self, sock: zmq.asyncio.Socket) -> None:
        now = time.monotonic()
        d = self._download
        if d is not None and d.length and d.deadline <= now:
            self._ask(sock, d)  # no chunk in time: ask again
        if self.releases is None:
            return
        for r in self.releases.results():
            key = (r.release, r.status)
            if self._results_due.get(key, 0.0) <= now:
                self._results_due[key] = now + self.options.ack_timeout_s
                self._send(sock, wire.encode(r))

    async def _result_acked(self, key: RecordKey) -> None:
        if self.releases is None:
            return
        for r in self.releases.results():
            if wire.result_key(key[0], r) == key:
                await self._off_loop(self.releases.reported, r)
                self._results_due.pop((r.release, r.status), None)
                log.info("link: the trainer has release %d's result (%s)", r.release, r.status)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a thread; _Stopped at once on stop() (the thread's result is then dropped)."""
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        wake = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({job, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
        if job not in done:
            raise _Stopped
        return job.result()


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("link: staging a downloaded release failed: %s: %s", type(exc).__name__, exc)


class LinkCollector:
    """The client's counters as Prometheus metrics, read at scrape time:
    ``metrics.registry.register(LinkCollector(client))``."""

    def __init__(self, client: LinkClient) -> None:
        self.client = client

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        s = self.client.stats
        yield CounterMetricFamily("sorterd_link_sent", "Records sent to the trainer (first sends).", value=s.sent)
        yield CounterMetricFamily("sorterd_link_acked", "Records the trainer has on disk (ACKed).", value=s.acked)
        yield CounterMetricFamily("sorterd_link_resent", "Records sent again (no ACK in time, NACK retry, "
                                  "reconnect).", value=s.resent)
        yield CounterMetricFamily("sorterd_link_nacked", "NACKs from the trainer.", value=s.nacked)
        yield CounterMetricFamily("sorterd_link_refused", "Records the trainer refused for good (kept aside in "
                                  "the outbox).", value=s.refused)
        yield GaugeMetricFamily("sorterd_link_connected", "1 while the trainer answers.", value=float(s.connected))
        yield GaugeMetricFamily("sorterd_link_in_flight", "Records sent and not yet answered.",
                                value=float(self.client.in_flight))
