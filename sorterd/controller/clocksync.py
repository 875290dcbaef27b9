"""Clock synchronisation: the controller's clock as a function of host time.

The host asks for the controller's clock now and then (GET_CLOCK); each
exchange gives a sample: host time sent, host time received, controller clock
read somewhere in between.  The controller clock is a line in host time
(offset + rate; a crystal's rate is off by tens of ppm and drifts slowly), so
the estimate is a least-squares line through the recent good samples:

* a sample's clock belongs to the midpoint of its round trip, uncertain by
  half the round-trip time (RTT), so only samples whose RTT is near the
  recent minimum are used (a slow event loop or a busy controller only
  lengthens the RTT, and such samples are dropped rather than averaged in);
* once a line exists, a sample it cannot explain (the model puts that clock
  outside its round trip by more than `tolerance_ns`) is an outlier; many in
  a row mean the model is wrong (the controller restarted): start again;
* with only a short span of samples the rate is poorly determined, so the fit
  has a prior: the nominal frequency, with the crystal tolerance as its
  uncertainty.  A few seconds of samples outweigh it.

Owned by one thread (the event loop's); everything is plain data.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    t_send_ns: int
    t_recv_ns: int
    clock: int

    @property
    def rtt_ns(self) -> int:
        return self.t_recv_ns - self.t_send_ns

    @property
    def t_mid_ns(self) -> int:
        return (self.t_send_ns + self.t_recv_ns) // 2


@dataclass(frozen=True)
class _Fit:
    t_ref_ns: int  # anchor sample (ints keep full precision)
    c_ref: int
    x_mean: float  # s since the anchor
    y_mean: float  # ticks since the anchor
    freq_hz: float


class ClockSync:
    def __init__(self, nominal_hz: float, *, window: int = 64, min_samples: int = 6, rtt_history: int = 32,
                 rtt_slack_ns: int = 50_000, max_rtt_ns: int = 5_000_000, tolerance_ns: int = 100_000,
                 prior_ppm: float = 200.0, noise_ns: float = 20_000.0) -> None:
        self.nominal_hz = float(nominal_hz)
        self.window = window
        self.min_samples = min_samples
        self.rtt_slack_ns = rtt_slack_ns
        self.max_rtt_ns = max_rtt_ns  # never use a round trip longer than this
        self.tolerance_ns = tolerance_ns
        # Weight of the prior on the rate, in s^2 (see the module docstring).
        self._prior = (noise_ns * 1e-9) ** 2 / (prior_ppm * 1e-6) ** 2
        # Every recent sample's RTT: the minimum follows changes of transport
        # (USB load, a busier event loop) within a few seconds.
        self._recent_rtt: deque[int] = deque(maxlen=rtt_history)
        self._good: deque[Sample] = deque(maxlen=window)
        self._fit: _Fit | None = None
        self._rejected_in_row = 0
        self.samples = 0
        self.accepted = 0
        self.outliers = 0
        self.restarts = 0
        self.last_rtt_ns: int | None = None
        self.last_residual_ns: float | None = None  # last good sample vs the line before it
        self.last_good_ns: int | None = None  # host time of the last good sample

    # -- samples --------------------------------------------------------------

    def add(self, t_send_ns: int, t_recv_ns: int, clock: int) -> bool:
        """One exchange; True if it was used."""
        s = Sample(t_send_ns, t_recv_ns, clock)
        self.samples += 1
        self.last_rtt_ns = s.rtt_ns
        self._recent_rtt.append(s.rtt_ns)
        if s.rtt_ns < 0 or s.rtt_ns > min(self.rtt_limit_ns, self.max_rtt_ns):
            return False  # its clock could belong anywhere in a long round trip
        if self._fit is not None and not self._explains(s):
            return self._outlier()
        self._rejected_in_row = 0
        if self._fit is not None:
            self.last_residual_ns = self.host_at(clock) - s.t_mid_ns
        self._good.append(s)
        self.accepted += 1
        self.last_good_ns = s.t_recv_ns
        self._refit()
        return True

    @property
    def min_rtt_ns(self) -> int:
        return min(self._recent_rtt) if self._recent_rtt else 0

    @property
    def rtt_limit_ns(self) -> int:
        """Longest round trip still used: a low quantile of the recent ones plus
        slack.  A quantile, not the minimum, so that one lucky exchange (or a
        change of transport) cannot starve the fit of samples for long."""
        recent = sorted(self._recent_rtt)
        low = recent[len(recent) // 4] if recent else 0
        return low + max(self.rtt_slack_ns, low // 2)

    def _explains(self, s: Sample) -> bool:
        t = self.host_at(s.clock)
        return s.t_send_ns - self.tolerance_ns <= t <= s.t_recv_ns + self.tolerance_ns

    def _outlier(self) -> bool:
        self.outliers += 1
        self._rejected_in_row += 1
        if self._rejected_in_row >= 8:
            self.reset()  # the line no longer describes this clock
            self.restarts += 1
        return False

    def reset(self) -> None:
        """Forget every sample (a new session: the controller may have restarted)."""
        self._good.clear()
        self._fit = None
        self._rejected_in_row = 0
        self.last_good_ns = None
        self.last_residual_ns = None

    def _refit(self) -> None:
        ref = self._good[0]
        xs = [(s.t_mid_ns - ref.t_mid_ns) * 1e-9 for s in self._good]
        ys = [float(s.clock - ref.clock) for s in self._good]
        n = len(xs)
        xm, ym = sum(xs) / n, sum(ys) / n
        sxx = sum((x - xm) ** 2 for x in xs)
        sxy = sum((x - xm) * (y - ym) for x, y in zip(xs, ys, strict=True))
        freq = (sxy + self._prior * self.nominal_hz) / (sxx + self._prior)
        self._fit = _Fit(ref.t_mid_ns, ref.clock, xm, ym, freq)

    # -- conversions ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._fit is not None and len(self._good) >= self.min_samples

    def _require(self) -> _Fit:
        if self._fit is None:
            raise RuntimeError("clock not synchronised")
        return self._fit

    def clock_at(self, t_ns: int) -> int:
        """The controller clock at host time t_ns."""
        f = self._require()
        return f.c_ref + round(f.y_mean + f.freq_hz * ((t_ns - f.t_ref_ns) * 1e-9 - f.x_mean))

    def host_at(self, clock: int) -> int:
        """The host time at which the controller clock reads `clock`."""
        f = self._require()
        return f.t_ref_ns + round(((clock - f.c_ref - f.y_mean) / f.freq_hz + f.x_mean) * 1e9)

    def ticks(self, duration_ns: int) -> int:
        return max(0, round(duration_ns * 1e-9 * self._require().freq_hz))

    @property
    def freq_hz(self) -> float | None:
        return self._fit.freq_hz if self._fit is not None else None

    @property
    def drift_ppm(self) -> float | None:
        f = self.freq_hz
        return None if f is None else (f / self.nominal_hz - 1.0) * 1e6
