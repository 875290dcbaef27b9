"""Clock sync: a line through good samples, with RTT filtering and outlier rejection."""

from __future__ import annotations

import random

import pytest

from sorterd.controller.clocksync import ClockSync

F_NOM = 12_000_000.0


class FakeController:
    """A controller clock with offset and drift; exchanges with jitter and asymmetry."""

    def __init__(self, drift_ppm: float, offset: int = 10**11, seed: int = 1) -> None:
        self.f = F_NOM * (1 + drift_ppm * 1e-6)
        self.offset = offset
        self.rng = random.Random(seed)

    def clock(self, t_ns: int) -> int:
        return self.offset + round(t_ns * self.f / 1e9)

    def exchange(self, t_send: int, slow: float = 0.0) -> tuple[int, int, int]:
        up = 40_000 + self.rng.expovariate(1 / 20_000)
        down = 40_000 + self.rng.expovariate(1 / 20_000) + slow
        t_read = t_send + int(up)
        return t_send, t_read + int(down), self.clock(t_read)


def feed(sync: ClockSync, ctl: FakeController, t0: int, n: int, every_ns: int, slow_every: int = 0) -> int:
    t = t0
    for i in range(n):
        slow = 3_000_000.0 if slow_every and i % slow_every == 0 else 0.0
        sync.add(*ctl.exchange(t, slow))
        t += every_ns
    return t


def test_fit_finds_offset_and_drift() -> None:
    ctl = FakeController(drift_ppm=37.0)
    sync = ClockSync(F_NOM)
    t = feed(sync, ctl, 1_000_000_000, 120, 50_000_000)
    assert sync.ready
    assert sync.drift_ppm == pytest.approx(37.0, abs=2.0)
    later = t + 300_000_000  # a pulse scheduled 300 ms after the last sample
    err_us = (sync.clock_at(later) - ctl.clock(later)) / F_NOM * 1e6
    assert abs(err_us) < 20
    c = ctl.clock(later)
    assert abs(sync.host_at(c) - later) < 20_000


def test_short_span_leans_on_the_nominal_rate() -> None:
    """A burst of 8 samples over 20 ms cannot measure ppm: the prior keeps the rate sane."""
    ctl = FakeController(drift_ppm=50.0)
    sync = ClockSync(F_NOM)
    feed(sync, ctl, 0, 8, 2_500_000)
    assert sync.ready and abs(sync.drift_ppm or 0) < 100


def test_slow_round_trips_are_not_used() -> None:
    ctl = FakeController(drift_ppm=-20.0)
    sync = ClockSync(F_NOM)
    feed(sync, ctl, 0, 200, 50_000_000, slow_every=3)
    assert sync.accepted < sync.samples  # the 3 ms round trips were dropped
    assert sync.drift_ppm == pytest.approx(-20.0, abs=2.0)


def test_a_sample_the_line_cannot_explain_is_an_outlier() -> None:
    ctl = FakeController(drift_ppm=10.0)
    sync = ClockSync(F_NOM)
    t = feed(sync, ctl, 0, 50, 50_000_000)
    before = sync.freq_hz
    t_send, t_recv, clock = ctl.exchange(t)
    assert not sync.add(t_send, t_recv, clock + 12_000)  # 1 ms off: impossible within its round trip
    assert sync.outliers == 1 and sync.freq_hz == before


def test_a_restarted_controller_is_learned_again() -> None:
    ctl = FakeController(drift_ppm=10.0)
    sync = ClockSync(F_NOM)
    t = feed(sync, ctl, 0, 50, 50_000_000)
    ctl.offset = 0  # it rebooted: its clock starts over
    t = feed(sync, ctl, t, 30, 50_000_000)
    assert sync.restarts == 1 and sync.ready
    assert abs(sync.clock_at(t) - ctl.clock(t)) < 0.0001 * F_NOM


def test_not_ready_means_no_conversion() -> None:
    sync = ClockSync(F_NOM)
    assert not sync.ready
    with pytest.raises(RuntimeError, match="not synchronised"):
        sync.clock_at(0)
