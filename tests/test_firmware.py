"""The valve-controller firmware: its portable core's C tests, and the host build on a pty.

The host build runs the same core as a board; these tests talk to it over the
real serial stack with the protocol client, and watch its pins through the
trace pipe (the simulator's oscilloscope).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorterd.controller import proto as P
from sorterd.sim.firmware import (
    TRACE_EDGE,
    TRACE_WATCHDOG,
    BlockingClient,
    HostFirmware,
    TraceRecord,
    firmware_binary,
    firmware_source,
)

pytestmark = pytest.mark.host_build  # skipped, with the reason, without make and a C compiler

FREQ = 12_000_000.0
MS = FREQ / 1000  # ticks per ms (nominal)


@pytest.fixture
def fw() -> Iterator[HostFirmware]:
    pytest.importorskip("serial", reason="the protocol client talks through pyserial (pip install pyserial)")
    f = HostFirmware(freq_hz=FREQ, drift_ppm=100.0, offset=5_000_000_000, replug_ms=300).start()
    try:
        yield f
    finally:
        f.stop()
        f.cleanup()


def ready_client(fw: HostFirmware, window_ms: float = 200.0, max_on_ms: float = 50.0) -> BlockingClient:
    """Configured and armed.  The late limit is generous (20 ms): a loaded CI box wakes
    this process late now and then, and these tests are not about that (the C tests are)."""
    c = BlockingClient(fw.port)
    c.connect()
    for out, pin in ((0, 2), (1, 3), (2, 4)):
        assert c.request(P.ConfigOutput(out, pin, 0, int(max_on_ms * MS)), P.Configured).status == 0
    c.request(P.Arm(int(window_ms * MS), int(20 * MS)), P.Armed)
    return c


def now_clock(c: BlockingClient) -> int:
    return int(c.request(P.GetClock(1), P.Clock).clock)


def edges(fw: HostFirmware, pin: int | None = None, at_least: int = 0) -> list[TraceRecord]:
    """Edges traced so far (waiting up to 1 s for at_least of them: the trace pipe
    and the serial reports are written by the same thread, but not atomically)."""
    got: list[TraceRecord] = []
    deadline = time.monotonic() + 1.0
    while True:
        got += [r for r in fw.read_records() if r.kind == TRACE_EDGE and (pin is None or r.pin == pin)]
        if len(got) >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.005)


@pytest.mark.host_build(rebuild=True)  # runs make itself: a cached binary is not enough
def test_core_unit_tests_pass_and_build_warning_free(tmp_path: Path) -> None:
    """C99 with -Wall -Wextra -Werror -pedantic -Wconversion; the core's own tests run."""
    res = subprocess.run(["make", "-s", "-C", str(firmware_source() / "host"), f"O={tmp_path}", "test"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "core tests passed" in res.stdout


def test_binary_is_cached() -> None:
    assert firmware_binary() == firmware_binary()
    assert os.access(firmware_binary(), os.X_OK)


def test_identity_and_a_clock_of_its_own(fw: HostFirmware) -> None:
    c = BlockingClient(fw.port)
    ident = c.connect()
    assert ident.version == P.PROTO_VERSION and ident.freq_hz == int(FREQ) and ident.outputs >= 3
    assert fw.truth is not None
    t0 = time.monotonic_ns()
    c0 = now_clock(c)
    t1 = time.monotonic_ns()
    # The firmware's clock is the truth's, read somewhere within the round trip.
    assert fw.truth.host_to_mcu(t0) - 10 <= c0 <= fw.truth.host_to_mcu(t1) + 10
    time.sleep(0.2)
    c1 = now_clock(c)
    rate = (c1 - c0) / ((time.monotonic_ns() - t0) * 1e-9)
    assert rate == pytest.approx(FREQ * (1 + 100e-6), rel=2e-2)  # drift is real, not nominal
    c.close()


def test_pulse_fires_and_reports_the_actual_stamped_edges(fw: HostFirmware) -> None:
    c = ready_client(fw)
    start = now_clock(c) + int(30 * MS)
    c.send(P.Schedule(7, 0, start, int(5 * MS)))
    fired = c.wait_for(P.Fired, 2.0)
    assert fired.pulse_id == 7 and fired.output == 0 and fired.flags == 0
    on, off = edges(fw, pin=2, at_least=2)
    assert (on.level, off.level) == (1, 0)
    assert (on.target, off.target) == (start, start + int(5 * MS))
    # The report carries the stamps taken after the pin changed, never the schedule.
    assert (fired.on_clock, fired.off_clock) == (on.actual, off.actual)
    assert on.actual >= on.target and off.actual >= off.target
    c.close()


def test_late_start_is_refused_and_never_fired(fw: HostFirmware) -> None:
    c = ready_client(fw)
    c.send(P.Schedule(1, 1, now_clock(c) - int(1 * MS), int(5 * MS)))
    refused = c.wait_for(P.Refused)
    assert (refused.pulse_id, P.REFUSAL_REASONS[refused.reason]) == (1, "late")
    c.send(P.Schedule(2, 1, now_clock(c) + int(20 * MS), int(60 * MS)))  # above max on-time
    assert P.REFUSAL_REASONS[c.wait_for(P.Refused).reason] == "bad duration"
    time.sleep(0.05)
    assert edges(fw, pin=3) == []
    c.close()


def test_silence_turns_every_output_off_within_the_window(fw: HostFirmware) -> None:
    """The host goes quiet with a valve open: the watchdog cuts it at last frame + window."""
    c = ready_client(fw, window_ms=100.0, max_on_ms=900.0)
    start = now_clock(c) + int(20 * MS)
    c.send(P.Schedule(1, 0, start, int(800 * MS)))
    t_last = time.monotonic_ns()  # nothing is sent after this
    time.sleep(0.4)
    recs = fw.read_records()
    truth = fw.truth
    assert truth is not None
    on, off = [r for r in recs if r.kind == TRACE_EDGE and r.pin == 2]
    [trip] = [r for r in recs if r.kind == TRACE_WATCHDOG]
    off_ns = truth.mcu_to_host(off.actual)
    assert truth.mcu_to_host(on.actual) < off_ns
    assert off_ns - t_last <= 100e6 + 50e6  # the window, plus a late wake-up on a busy machine
    assert off.actual <= trip.actual
    c.pump(0.05)
    fired = c.wait_for(P.Fired)
    assert fired.flags & P.FIRED_CUT_WATCHDOG
    assert c.wait_for(P.Watchdog).outputs_on == 0b001
    # Off until the host arms again.
    c.send(P.Schedule(2, 0, now_clock(c) + int(20 * MS), int(5 * MS)))
    assert P.REFUSAL_REASONS[c.wait_for(P.Refused).reason] == "disarmed"
    c.request(P.Arm(int(100 * MS), int(20 * MS)), P.Armed)
    c.send(P.Schedule(3, 0, now_clock(c) + int(20 * MS), int(5 * MS)))
    assert c.wait_for(P.Fired).pulse_id == 3
    c.close()


def _fuzz_frames(rng: random.Random, seq: int, acked: int, ack: int, valid: bytes, start: int) -> list[bytes]:
    """Hostile and broken frames built around a schedule for output 1 (pin 3).

    The firmware expects a sequence number in [acked, seq] (frames in flight
    may be retransmitted).  A forged frame with exactly that number and a good
    CRC is indistinguishable from the host's own (the link guards against
    noise, it is not authenticated), so every mutation that could end up with
    a good CRC -- a frame cut short and completed by the next byte, a LEN that
    happens to fit -- starts from a sequence number outside that window.  A
    single flipped bit is always caught by the CRC, so that one may use it."""
    body = P.Schedule(rng.randrange(1 << 32), 1, start, int(3 * MS)).encode()
    good_next = P.encode_frame(seq, ack, 0, body)
    foreign = P.encode_frame((seq + 100) & 0xFF, ack, 0, body)
    flipped = bytearray(good_next)
    flipped[rng.randrange(1, len(flipped))] ^= 1 << rng.randrange(8)
    relen = bytearray(foreign)
    relen[1] = rng.choice([v for v in range(P.MAX_PAYLOAD + 1) if v != len(body)])
    return [
        bytes(flipped),                                                   # bad CRC
        bytes(relen),                                                     # LEN disagrees with the frame
        foreign[: rng.randrange(1, len(foreign))],                        # cut short
        P.encode_frame((seq + rng.randrange(1, 100)) & 0xFF, ack, 0, body),  # out of order
        P.encode_frame((acked - rng.randrange(1, 100)) & 0xFF, ack, 0, body),  # replayed old sequence number
        valid,                                                            # accepted frames, replayed
        bytes([P.SOF, 200]) + bytes(rng.randrange(256) for _ in range(60)),  # oversized LEN
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))),  # random bytes
        bytes([P.SOF] * rng.randrange(1, 10)),                            # lone SOFs
    ]


def test_fuzzed_frames_never_actuate_and_never_crash(fw: HostFirmware) -> None:
    """Armed, with real pulses on output 0: nothing hostile may ever move output 1."""
    c = ready_client(fw, window_ms=200.0)
    rng = random.Random(4)
    deadline = time.monotonic() + 3.0
    legit = 0
    while time.monotonic() < deadline:
        c.send(P.Schedule(10_000 + legit, 0, now_clock(c) + int(15 * MS), int(2 * MS)))
        legit += 1
        valid = c.last_written  # the exact bytes of an accepted schedule, to replay
        start = now_clock(c) + int(10 * MS)
        for junk in _fuzz_frames(rng, c.link.tx_next, c.link.tx_acked, c.link.rx_expected, valid, start):
            c.write_raw(junk)
        c.pump(0.003)
    # Well-framed messages of the wrong length, in sequence: refused with an ERROR.
    for body in (P.Schedule(1, 1, now_clock(c) + int(10 * MS), int(3 * MS)).encode()[:-1], b"\x06" + bytes(20)):
        c.link.send(body)
        assert c.wait_for(P.Error).code == 2  # bad length
    time.sleep(0.1)
    recs = edges(fw)
    assert fw.alive(), "the firmware crashed"
    assert [r for r in recs if r.pin == 3] == [], "a fuzzed frame moved an output"
    c.pump(0.05)
    fired = [m for m in c.inbox if isinstance(m, P.Fired)]
    assert len(fired) > 50 and all(m.output == 0 and m.pulse_id >= 10_000 for m in fired)
    # Every real pulse is on the pin, with the stamps its report carries.
    ons = sorted(r.actual for r in recs if r.pin == 2 and r.level == 1)
    assert ons == sorted(m.on_clock for m in fired)
    stats = c.request(P.GetStats(), P.Stats)
    assert stats.crc_errors > 0 and stats.seq_errors > 0 and stats.oversize > 0 and stats.bad_messages == 2
    assert c.request(P.GetClock(9), P.Clock).token == 9  # still answering
    c.close()


def test_unplug_and_replug(fw: HostFirmware) -> None:
    c = ready_client(fw)
    fw.unplug()
    time.sleep(0.05)
    assert not Path(fw.port).exists()
    with pytest.raises(Exception):  # noqa: B017 -- EOF or EIO, as when a USB device goes
        for _ in range(20):
            c.pump(0.01)
            c.send(P.Heartbeat())
    c.close()
    time.sleep(0.4)
    c2 = BlockingClient(fw.port)
    assert c2.connect().version == P.PROTO_VERSION
    recs = fw.read_records()
    assert [r for r in recs if r.kind == TRACE_WATCHDOG], "armed and unplugged: the watchdog tripped"
    c2.close()
