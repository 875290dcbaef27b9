"""Clock synchronisation: the controller's clock as a function of host time.

The host asks for the controller's clock now and then (GET_CLOCK); each
exchange gives a sample: host time sent, host time received, controller clock
read somewhere in between.  The controller clock is a line in host time
(offset + rate; a crystal's rate is off by tens of ppm and drifts slowly), so
the estimate is a weighted least-squares line through the recent samples,
in the manner of Klipper's `clocksync.py` on a busy Raspberry Pi:

* a sample's clock belongs to the midpoint of its round trip, uncertain by
  half the round-trip time (RTT).  A busy host only ever lengthens a round
  trip (the reply waits for the event loop), never moves the true read out
  of it, so each sample is weighted by 1 / (half-RTT^2 + noise^2): a precise
  exchange outweighs a hundred sloppy ones, and a loaded spell cannot drag
  the line by more than the precision of what it saw.  Round trips far above
  the recent ones (a stalled event loop) are not used -- unless the line,
  extrapolating through a gap, is by now less certain than such a sample;
* once a line exists, a sample it cannot explain (the model puts that clock
  outside its round trip by more than `tolerance_ns` plus the line's own
  uncertainty there) is an outlier, and until it is explained every
  conversion is uncertain by at least that much.  A few in a row agreeing
  with each other mean the line is wrong (the controller restarted, or a
  long spell of sloppy samples misled it): the line starts again *from those
  samples*, so there is no gap in which nothing can be converted;
* with only a short span of samples the rate is poorly determined, so the fit
  has a prior: the nominal frequency, with the crystal tolerance as its
  uncertainty.  A few seconds of samples outweigh it;
* the line keeps its last estimate through a gap in the samples (a stalled
  host, a run of slow exchanges): a conversion is only as wrong as the fit's
  own uncertainty plus the rate's possible wander since the last good
  sample, and `error_ns(t)` says how much that is.  The caller decides what
  is too much, instead of declaring the sync lost after a fixed time.

Owned by one thread (the event loop's); everything is plain data.
"""

from __future__ import annotations

import math
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
    x_mean: float  # s since the anchor (weighted mean)
    y_mean: float  # ticks since the anchor (weighted mean)
    freq_hz: float
    offset_var_s2: float  # variance of the line at x_mean, s^2
    offset_bias_s: float  # the most a one-sided delay could have moved it there (weighted mean half-RTT), s
    rate_var: float  # variance of the relative rate (1 = 1e6 ppm), dimensionless


class ClockSync:
    def __init__(self, nominal_hz: float, *, window: int = 64, min_samples: int = 6, rtt_history: int = 32,
                 rtt_slack_ns: int = 50_000, max_rtt_ns: int = 5_000_000, tolerance_ns: int = 100_000,
                 reseed_after: int = 4,
                 prior_ppm: float = 200.0, noise_ns: float = 20_000.0, wander_ppm: float = 5.0) -> None:
        self.nominal_hz = float(nominal_hz)
        self.window = window
        self.min_samples = min_samples
        self.rtt_slack_ns = rtt_slack_ns
        self.max_rtt_ns = max_rtt_ns  # never use a round trip longer than this
        self.tolerance_ns = tolerance_ns
        self.reseed_after = reseed_after  # outliers in a row that replace the line
        self._prior_info = 1.0 / (prior_ppm * 1e-6) ** 2  # information on the relative rate
        self._noise_s2 = (noise_ns * 1e-9) ** 2
        self.wander = wander_ppm * 1e-6  # how far the true rate may move from the fitted one over a gap
        # Every recent sample's RTT: the minimum follows changes of transport
        # (USB load, a busier event loop) within a few seconds.
        self._recent_rtt: deque[int] = deque(maxlen=rtt_history)
        self._good: deque[Sample] = deque(maxlen=window)
        self._fit: _Fit | None = None
        self._rejected: list[Sample] = []  # the outliers since the last good sample
        self._pending_miss_ns = 0  # the largest of their misses: the line may be this wrong
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
        if not self._precise_enough(s):
            return False  # its clock could belong anywhere in a long round trip
        miss = self._miss_ns(s)
        if self._fit is not None and miss > self.tolerance_ns + self.error_ns(s.t_mid_ns, pending=False):
            return self._outlier(s, miss)
        self._rejected.clear()
        self._pending_miss_ns = 0
        if self._fit is not None:
            self.last_residual_ns = self.host_at(clock) - s.t_mid_ns
        self._use(s)
        return True

    def _use(self, s: Sample) -> None:
        self._good.append(s)
        self.accepted += 1
        self.last_good_ns = s.t_recv_ns
        self._refit()

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

    def _precise_enough(self, s: Sample) -> bool:
        """Used: a round trip near the recent fast ones, or one that still pins the
        clock down better than the line does by now (after a spell of slow ones the
        line is extrapolating: a 1 ms round trip beats none at all)."""
        if s.rtt_ns < 0 or s.rtt_ns > self.max_rtt_ns:
            return False
        return s.rtt_ns <= self.rtt_limit_ns or s.rtt_ns / 2 < self.error_ns(s.t_mid_ns, pending=False)

    def forget_round_trips(self) -> None:
        """The transport changed (startup's quiet burst is over, the event loop serves):
        judge round trips by the ones to come, keep the line."""
        self._recent_rtt.clear()

    def _miss_ns(self, s: Sample) -> int:
        """How far outside the sample's round trip the line puts its clock (0: inside)."""
        if self._fit is None:
            return 0
        t = self.host_at(s.clock)
        return max(0, s.t_send_ns - t, t - s.t_recv_ns)

    def _outlier(self, s: Sample, miss_ns: int) -> bool:
        self.outliers += 1
        self._rejected.append(s)
        self._pending_miss_ns = max(self._pending_miss_ns, miss_ns)
        if len(self._rejected) >= self.reseed_after and self._consistent(self._rejected):
            self._reseed()
            return True
        return False

    def _consistent(self, samples: list[Sample]) -> bool:
        """Do these samples agree on one clock offset (at the nominal rate)?  Then
        they describe the clock as it is now, and the old line does not."""
        ref = samples[0]
        offs = [(s.clock - ref.clock) / self.nominal_hz * 1e9 - (s.t_mid_ns - ref.t_mid_ns) for s in samples]
        spread = max(offs) - min(offs)
        return spread <= self.tolerance_ns + max(s.rtt_ns for s in samples)

    def _reseed(self) -> None:
        """The line no longer describes this clock: start again from the samples that say so."""
        samples = list(self._rejected)
        self.reset()
        self.restarts += 1
        for s in samples:
            self._use(s)

    def reset(self) -> None:
        """Forget every sample (a new session: the controller may have restarted)."""
        self._good.clear()
        self._fit = None
        self._rejected.clear()
        self._pending_miss_ns = 0
        self.last_good_ns = None
        self.last_residual_ns = None

    def _refit(self) -> None:
        ref = self._good[0]
        xs = [(s.t_mid_ns - ref.t_mid_ns) * 1e-9 for s in self._good]
        ys = [float(s.clock - ref.clock) for s in self._good]
        hs = [s.rtt_ns * 0.5e-9 for s in self._good]
        ws = [1.0 / (h * h + self._noise_s2) for h in hs]  # 1/s^2
        sw = sum(ws)
        xm = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
        ym = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
        sxx = sum(w * (x - xm) ** 2 for w, x in zip(ws, xs, strict=True))
        sxy = sum(w * (x - xm) * (y - ym) for w, x, y in zip(ws, xs, ys, strict=True))
        info = sxx + self._prior_info
        freq = (sxy + self._prior_info * self.nominal_hz) / info
        bias = sum(w * h for w, h in zip(ws, hs, strict=True)) / sw
        self._fit = _Fit(ref.t_mid_ns, ref.clock, xm, ym, freq, 1.0 / sw, bias, 1.0 / info)

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

    def error_ns(self, t_ns: int, *, pending: bool = True) -> float:
        """A bound on the error of converting host time t_ns: the line's offset error
        (three standard errors, or what a delay on one side of every round trip
        could have done, whichever is more), plus three standard errors of the rate
        times the distance from the samples' centre, plus the rate's possible wander
        since the last good sample, and at least the miss of any outlier not yet
        explained.  Grows with extrapolation; inf when there is no line."""
        f = self._fit
        if f is None or self.last_good_ns is None:
            return math.inf
        dx = (t_ns - f.t_ref_ns) * 1e-9 - f.x_mean
        offset_s = max(3.0 * math.sqrt(f.offset_var_s2), f.offset_bias_s)
        age_s = max(0.0, (t_ns - self.last_good_ns) * 1e-9)
        bound = (offset_s + 3.0 * abs(dx) * math.sqrt(f.rate_var) + self.wander * age_s) * 1e9
        return max(bound, float(self._pending_miss_ns)) if pending else bound

    def ticks(self, duration_ns: int) -> int:
        return max(0, round(duration_ns * 1e-9 * self._require().freq_hz))

    @property
    def freq_hz(self) -> float | None:
        return self._fit.freq_hz if self._fit is not None else None

    @property
    def rate_error_ppm(self) -> float:
        """One standard error of the fitted rate, in ppm (the prior's width before any samples)."""
        f = self._fit
        return math.inf if f is None else math.sqrt(f.rate_var) * 1e6

    @property
    def drift_ppm(self) -> float | None:
        f = self.freq_hz
        return None if f is None else (f / self.nominal_hz - 1.0) * 1e6
