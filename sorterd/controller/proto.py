"""The valve-controller wire protocol, host side: frames, messages, the link.

The byte layout is specified in `hw/PROTOCOL.md` (next to the firmware's C
core, `hw/firmware/core/vc_proto.h` and `vc_core.h`); this module must match it.
In short:

    SOF(0x7E) LEN SEQ ACK FLAGS PAYLOAD[LEN] CRC16-hi CRC16-lo

CRC16-CCITT (poly 0x1021, init 0xFFFF) over LEN..PAYLOAD.  Every payload is
one message: a type byte and little-endian fields.  Both directions run
go-back-N: a data frame (LEN > 0) takes the next sequence number and stays
queued until the peer's cumulative ACK covers it; it is sent again after a
timeout.  A frame with LEN = 0 is a pure acknowledgement.  The host opens a
session with SYN + IDENTIFY; the controller answers with a SYN-flagged
IDENTITY, and both sides restart their sequence numbers.

Nothing here does I/O: `Link` turns payloads into bytes and bytes into
payloads, so the same code runs under the event loop, a blocking startup and
the fuzz tests.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import astuple, dataclass, field
from typing import ClassVar

SOF = 0x7E
MAX_PAYLOAD = 48
HEADER = 5
TRAILER = 2
MAX_FRAME = HEADER + MAX_PAYLOAD + TRAILER
FLAG_SYN = 0x01
PROTO_VERSION = 1


class ProtocolError(ValueError):
    """A payload that is not a well-formed message."""


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC16-CCITT (poly 0x1021, init 0xFFFF, no reflection): 0x29B1 for b'123456789'."""
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


def encode_frame(seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes: at most {MAX_PAYLOAD}")
    body = bytes((len(payload), seq & 0xFF, ack & 0xFF, flags & 0xFF)) + payload
    return bytes((SOF,)) + body + crc16(body).to_bytes(2, "big")


@dataclass(frozen=True)
class Frame:
    seq: int
    ack: int
    flags: int
    payload: bytes


@dataclass
class FrameDecoder:
    """Byte stream -> good frames.  After a bad frame it drops one byte and
    scans for the next SOF, exactly like the firmware's parser."""

    buf: bytearray = field(default_factory=bytearray)
    frames: int = 0
    crc_errors: int = 0
    oversize: int = 0
    garbage: int = 0

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out: list[Frame] = []
        while (frame := self._next()) is not None:
            out.append(frame)
        return out

    def _next(self) -> Frame | None:
        buf = self.buf
        while buf:
            if buf[0] != SOF:
                self._resync()
                continue
            if len(buf) < 2:
                return None
            if buf[1] > MAX_PAYLOAD:
                self.oversize += 1
                self._resync()
                continue
            need = HEADER + TRAILER + buf[1]
            if len(buf) < need:
                return None
            if crc16(bytes(buf[1:need - 2])) != int.from_bytes(buf[need - 2:need], "big"):
                self.crc_errors += 1
                self._resync()
                continue
            frame = Frame(buf[2], buf[3], buf[4], bytes(buf[HEADER:need - 2]))
            del buf[:need]
            self.frames += 1
            return frame
        return None

    def _resync(self) -> None:
        nxt = self.buf.find(SOF, 1)
        dropped = len(self.buf) if nxt < 0 else nxt
        self.garbage += dropped
        del self.buf[:dropped]


# -- messages -----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int]
    FMT: ClassVar[str]  # struct format of the fields after the type byte

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + struct.pack("<" + self.FMT, *astuple(self))


@dataclass(frozen=True)
class Identify(Message):
    TYPE = 0x01
    FMT = ""


@dataclass(frozen=True)
class GetClock(Message):
    TYPE = 0x02
    FMT = "I"
    token: int


@dataclass(frozen=True)
class ConfigOutput(Message):
    TYPE = 0x03
    FMT = "BBBI"
    output: int
    pin: int
    flags: int  # bit 0: active low
    max_on: int  # ticks


@dataclass(frozen=True)
class Arm(Message):
    TYPE = 0x04
    FMT = "II"
    window: int  # ticks of host silence before everything goes off
    late_limit: int  # ticks a start may have passed when the timer runs


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = 0x05
    FMT = ""


@dataclass(frozen=True)
class Schedule(Message):
    TYPE = 0x06
    FMT = "IBQI"
    pulse_id: int
    output: int
    start: int  # controller clock
    duration: int  # ticks


@dataclass(frozen=True)
class Cancel(Message):
    TYPE = 0x07
    FMT = "I"
    pulse_id: int


@dataclass(frozen=True)
class Reset(Message):
    TYPE = 0x08
    FMT = ""


@dataclass(frozen=True)
class GetStats(Message):
    TYPE = 0x09
    FMT = ""


@dataclass(frozen=True)
class Identity(Message):
    TYPE = 0x81
    FMT = "BBBBI8s"
    version: int
    outputs: int
    queue: int
    window: int
    freq_hz: int  # nominal; the true rate is what clock sync finds
    name: bytes


@dataclass(frozen=True)
class Clock(Message):
    TYPE = 0x82
    FMT = "IQ"
    token: int
    clock: int


@dataclass(frozen=True)
class Configured(Message):
    TYPE = 0x83
    FMT = "BB"
    output: int
    status: int


@dataclass(frozen=True)
class Armed(Message):
    TYPE = 0x84
    FMT = "IIQ"
    window: int
    late_limit: int
    clock: int


@dataclass(frozen=True)
class Fired(Message):
    TYPE = 0x85
    FMT = "IBBQQ"
    pulse_id: int
    output: int
    flags: int
    on_clock: int  # actual edges, stamped by the controller after the pin changed
    off_clock: int


@dataclass(frozen=True)
class Refused(Message):
    TYPE = 0x86
    FMT = "IBBQ"
    pulse_id: int
    output: int
    reason: int
    clock: int


@dataclass(frozen=True)
class Watchdog(Message):
    TYPE = 0x87
    FMT = "QQB"
    clock: int
    last_heard: int
    outputs_on: int  # bit mask of the outputs that were on


@dataclass(frozen=True)
class Cancelled(Message):
    TYPE = 0x88
    FMT = "IB"
    pulse_id: int
    result: int


@dataclass(frozen=True)
class ResetDone(Message):
    TYPE = 0x89
    FMT = "Q"
    clock: int


@dataclass(frozen=True)
class Stats(Message):
    TYPE = 0x8A
    FMT = "10I"
    rx_frames: int
    crc_errors: int
    seq_errors: int
    garbage: int
    oversize: int
    bad_messages: int
    retransmits: int
    tx_dropped: int
    sessions: int
    watchdog_trips: int


@dataclass(frozen=True)
class Error(Message):
    TYPE = 0x8B
    FMT = "BB"
    code: int
    command: int


MESSAGES: dict[int, type[Message]] = {cls.TYPE: cls for cls in (
    Identify, GetClock, ConfigOutput, Arm, Heartbeat, Schedule, Cancel, Reset, GetStats,
    Identity, Clock, Configured, Armed, Fired, Refused, Watchdog, Cancelled, ResetDone, Stats, Error)}

REFUSAL_REASONS = {
    1: "late", 2: "queue full", 3: "bad output", 4: "bad duration", 5: "overlap", 6: "disarmed",
    7: "late at fire", 8: "duplicate id", 9: "too far ahead",
}
FIRED_CUT_MAX_ON = 0x01
FIRED_CUT_WATCHDOG = 0x02
CONFIG_STATUS = {0: "ok", 1: "bad output", 2: "bad pin", 3: "busy (armed)", 4: "bad value"}
CANCEL_OK, CANCEL_UNKNOWN, CANCEL_ALREADY_ON = 0, 1, 2
ERROR_CODES = {1: "unknown command", 2: "bad length", 3: "no session"}


def decode(payload: bytes) -> Message:
    """A payload -> its message; ProtocolError for anything malformed."""
    if not payload:
        raise ProtocolError("empty payload")
    cls = MESSAGES.get(payload[0])
    if cls is None:
        raise ProtocolError(f"unknown message type 0x{payload[0]:02x}")
    body = payload[1:]
    if len(body) != struct.calcsize("<" + cls.FMT):
        raise ProtocolError(f"{cls.__name__}: {len(body)} bytes of fields, expected {struct.calcsize('<' + cls.FMT)}")
    return cls(*struct.unpack("<" + cls.FMT, body))


# -- the link (go-back-N, sans I/O) -------------------------------------------


@dataclass
class _Sent:
    frame: bytes
    seq: int


class Link:
    """Host end of the link.  Owned by one thread (the event loop's).

    `start()` queues a SYN; `send()` queues payloads; `receive()` takes decoded
    frames and returns the payloads delivered in order; `output(now)` returns
    the bytes to write now (new frames within the window, retransmissions,
    a pure ack when one is owed).
    """

    def __init__(self, window: int = 8, rto_ns: int = 20_000_000, max_backlog: int = 64) -> None:
        self.window = window
        self.rto_ns = rto_ns
        self.max_backlog = max_backlog
        self.retransmits = 0
        self.seq_errors = 0
        self._reset()

    def _reset(self) -> None:
        self.tx_next = 0
        self.tx_acked = 0
        self.rx_expected = 0
        self.established = False  # the controller has answered our SYN
        self._unacked: deque[_Sent] = deque()
        self._queue: deque[tuple[int, bytes]] = deque()  # (flags, payload) not yet framed
        self._sent_at = 0
        self._need_ack = False

    def start(self, syn_payload: bytes) -> None:
        """Begin a session: everything earlier is void on both sides."""
        self._reset()
        self._queue.append((FLAG_SYN, syn_payload))

    def send(self, payload: bytes) -> bool:
        """Queue a payload; False if the backlog is full (link stalled)."""
        if len(self._queue) >= self.max_backlog:
            return False
        self._queue.append((0, payload))
        return True

    @property
    def backlog(self) -> int:
        """Payloads queued or in flight without acknowledgement."""
        return len(self._queue) + len(self._unacked)

    def receive(self, frame: Frame, now_ns: int) -> bytes | None:
        if not self.established:
            if not frame.flags & FLAG_SYN or not frame.payload:
                return None  # left over from an earlier session
            self.established = True
            self.rx_expected = frame.seq
        elif frame.flags & FLAG_SYN:
            return None  # a retransmitted answer to our SYN
        self._take_ack(frame.ack, now_ns)
        if not frame.payload:
            return None
        if frame.seq != self.rx_expected:
            self.seq_errors += 1
            self._need_ack = True
            return None
        self.rx_expected = (self.rx_expected + 1) & 0xFF
        self._need_ack = True
        return frame.payload

    def _take_ack(self, ack: int, now_ns: int) -> None:
        acked = (ack - self.tx_acked) & 0xFF
        if acked == 0 or acked > len(self._unacked):
            return
        for _ in range(acked):
            self._unacked.popleft()
        self.tx_acked = ack & 0xFF
        self._sent_at = now_ns

    def output(self, now_ns: int) -> bytes:
        out = bytearray()
        while self._queue and len(self._unacked) < self.window:
            if not self.established and self._unacked:
                break  # nothing but the SYN until the controller answers it
            flags, payload = self._queue.popleft()
            frame = encode_frame(self.tx_next, self.rx_expected, flags, payload)
            if not self._unacked:
                self._sent_at = now_ns
            self._unacked.append(_Sent(frame, self.tx_next))
            self.tx_next = (self.tx_next + 1) & 0xFF
            self._need_ack = False
            out += frame
        # An unanswered SYN is not repeated here: the session restarts it on its own timer.
        if self.established and self._unacked and now_ns - self._sent_at >= self.rto_ns:
            self.retransmits += 1
            self._sent_at = now_ns
            for s in self._unacked:
                out += s.frame
        if self._need_ack:
            out += encode_frame(self.tx_next, self.rx_expected, 0, b"")
            self._need_ack = False
        return bytes(out)

    def next_deadline(self) -> int | None:
        """When output() next has a retransmission to make (host ns)."""
        return self._sent_at + self.rto_ns if self._unacked else None
