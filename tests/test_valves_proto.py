"""The controller wire protocol, host side: CRC, framing, messages, the go-back-N link."""

from __future__ import annotations

import dataclasses
import random

import pytest

from sorterd.controller import proto as P


def test_crc16_ccitt_check_value() -> None:
    assert P.crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE


def test_frame_layout_matches_the_protocol_document() -> None:
    f = P.encode_frame(3, 7, P.FLAG_SYN, b"\x01")
    assert f[:5] == bytes([0x7E, 1, 3, 7, 1]) and f[5] == 0x01
    assert int.from_bytes(f[6:8], "big") == P.crc16(f[1:6])
    [frame] = P.FrameDecoder().feed(f)
    assert frame == P.Frame(3, 7, P.FLAG_SYN, b"\x01")


def test_messages_round_trip_with_little_endian_fields() -> None:
    msg = P.Schedule(pulse_id=0x01020304, output=2, start=0x1122334455667788, duration=600)
    raw = msg.encode()
    assert raw[0] == 0x06 and raw[1:5] == bytes([4, 3, 2, 1]) and raw[5] == 2 and len(raw) == 18
    assert P.decode(raw) == msg
    for cls in P.MESSAGES.values():
        values = [b"vc-host\x00" if f.name == "name" else 1 for f in dataclasses.fields(cls)]
        m = cls(*values)
        assert P.decode(m.encode()) == m
        assert len(m.encode()) <= P.MAX_PAYLOAD


@pytest.mark.parametrize("payload, why", [
    (b"", "empty"), (b"\x70", "unknown message type"), (b"\x06\x00", "Schedule: 1 bytes"),
])
def test_malformed_payloads_are_refused(payload: bytes, why: str) -> None:
    with pytest.raises(P.ProtocolError, match=why):
        P.decode(payload)


def test_decoder_resynchronises_after_garbage_and_bad_frames() -> None:
    good = [P.encode_frame(i, 0, 0, P.GetClock(i).encode()) for i in range(3)]
    bad_crc = bytearray(good[1])
    bad_crc[-1] ^= 0xFF
    stream = b"\x00\x7e\x7e" + good[0] + bytes(bad_crc) + b"\x7e\xff" + good[1][:4] + good[2]
    dec = P.FrameDecoder()
    frames = dec.feed(stream)
    assert [f.seq for f in frames] == [0, 2]
    assert dec.crc_errors >= 1 and dec.oversize >= 1 and dec.garbage > 0


def test_decoder_never_raises_on_random_bytes() -> None:
    rng = random.Random(7)
    dec = P.FrameDecoder()
    for _ in range(3000):
        for frame in dec.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(80)))):
            try:
                P.decode(frame.payload)
            except P.ProtocolError:
                pass
    assert len(dec.buf) < P.MAX_FRAME


class Peer:
    """The controller's side of the link, in Python, for exercising Link alone."""

    def __init__(self) -> None:
        self.link = P.Link()
        self.dec = P.FrameDecoder()
        self.got: list[bytes] = []

    def take(self, data: bytes, now: int) -> None:
        for f in self.dec.feed(data):
            if f.flags & P.FLAG_SYN:
                self.link.start(b"")  # reset; answer with a SYN frame
                self.link._queue.clear()
                self.link._queue.append((P.FLAG_SYN, P.Identity(1, 8, 32, 8, 12_000_000, b"peer\0\0\0\0").encode()))
                self.link.established = True
                self.link.rx_expected = (f.seq + 1) & 0xFF
                continue
            payload = self.link.receive(f, now)
            if payload is not None:
                self.got.append(payload)


def test_link_delivers_in_order_despite_loss_with_retransmission() -> None:
    host, peer = P.Link(rto_ns=10), Peer()
    host.start(P.Identify().encode())
    peer.take(host.output(0), 0)
    for f in P.FrameDecoder().feed(peer.link.output(0)):
        host.receive(f, 0)
    assert host.established
    for i in range(20):
        host.send(P.GetClock(i).encode())
    t = 0
    lose = True
    while len(peer.got) < 20 and t < 10_000:
        t += 5
        out = host.output(t)
        if lose and out:
            lose = False  # the first window is lost on the wire
            continue
        peer.take(out, t)
        for f in P.FrameDecoder().feed(peer.link.output(t)):
            host.receive(f, t)
    assert [P.decode(p).token for p in peer.got] == list(range(20))  # type: ignore[attr-defined]
    assert host.retransmits >= 1 and host.backlog == 0


def test_link_ignores_frames_from_an_earlier_session() -> None:
    host = P.Link()
    host.start(P.Identify().encode())
    host.output(0)
    stale = P.Frame(5, 0, 0, P.Clock(1, 2).encode())
    assert host.receive(stale, 0) is None and not host.established
    assert host.receive(P.Frame(0, 1, P.FLAG_SYN, P.Identity(1, 8, 32, 8, 1, b"x" * 8).encode()), 0) is not None
    assert host.established and host.backlog == 0


def test_the_examples_in_the_protocol_document() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "hw" / "PROTOCOL.md").read_text()
    syn = P.encode_frame(0, 0, P.FLAG_SYN, P.Identify().encode())
    sched = P.encode_frame(5, 3, 0, P.Schedule(7, 0, 0x0000001CBE991A08, 72000).encode())
    assert syn.hex(" ").upper() in doc
    assert " | ".join([sched[:5].hex(" "), sched[5:-2].hex(" "), sched[-2:].hex(" ")]).upper() in doc
