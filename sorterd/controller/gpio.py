"""GPIO outputs (the `gpio` valves and lights): lines driven by one real-time thread on the host.

asyncio timers wake ~1 ms late with multi-ms tails; this backend gives the
edges to one dedicated thread instead:

* SCHED_FIFO when permitted (else logged), memory locked (mlockall, when
  permitted), timer slack 1 ns;
* absolute deadlines: it blocks on a condition until an edge is ~1.5 ms away,
  then sleeps with clock_nanosleep(TIMER_ABSTIME) -- a C call, so the GIL is
  free meanwhile -- until `spin_us` before the edge, then spins on the
  monotonic clock; the edge is stamped with the time read right after the
  line was written (the actual time, never the scheduled one);
* never late: an edge whose thread wakes more than `late_limit_us` after its
  start is refused; a valve is never on longer than `max_on_ms`;
* outputs forced off on every exit path: close(), an exception in the thread,
  interpreter exit (atexit).

Limits, honestly: this is a Python thread on a general-purpose kernel.  It
needs the GIL to toggle a line, so another thread holding it delays an edge
(the backend shortens the interpreter's switch interval, `switch_interval_us`);
without PREEMPT_RT a kernel or an interrupt storm can delay any process by
milliseconds; and if the process is killed (SIGKILL, OOM, a crash in native
code) nothing turns the lines off -- they keep their last level.  The `mcu`
backend has none of these problems (hw/README.md compares them).

Threads: the event loop's thread calls schedule/cancel/outcome/close; the
valve thread owns the driver while it runs.  Shared state (the edge heap and
each job's state) is guarded by `_cond`.  Outcomes go back to the loop with
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import heapq
import importlib
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.controller.outputs import Pulse, PulseOutcome, ValveStats, close_at_exit, closed
from sorterd.domain import JET_BINS

log = logging.getLogger(__name__)

GPIO_LIBRARIES = ("gpiod", "jetson")


@dataclass(frozen=True)
class GpioLibraryOptions:
    """The GPIO options every GPIO backend (valves, lights, the beam trigger) spells the same way.

    Each backend's options class mixes this in, so `library`, `chip` and
    `numbering` are declared (and documented) once."""

    library: str = opt("gpiod", "GPIO library: gpiod (libgpiod v2: Raspberry Pi 5, any Linux; kernel edge timestamps) "
                       "or jetson (Jetson.GPIO).", choices=GPIO_LIBRARIES)
    chip: str = opt("/dev/gpiochip0", "library = 'gpiod': GPIO character device (Raspberry Pi 5: /dev/gpiochip0 on "
                    "kernels >= 6.6, gpiochip4 before).")
    numbering: str = opt("BOARD", "library = 'jetson': pin numbering mode.", choices=("BOARD", "BCM", "CVM", "TEGRA_SOC"))


@dataclass(frozen=True)
class GpioLines:
    """What the output thread drives: named lines and its timing limits.

    Built by the valves' and the lights' options (`lines()`), each from its own section."""

    library: str
    chip: str
    numbering: str
    pins: dict[str, int]
    active_low: bool
    max_on_ms: float
    late_limit_us: float
    min_lead_ms: float
    spin_us: float
    rt_priority: int
    switch_interval_us: float

NEAR_NS = 1_500_000  # from this close to an edge the thread stops listening to the condition
HOLD_GIL_S = 0.05  # switch interval while spinning to an edge (longer than any spin)

# Told (valve, actual_on_ns, actual_off_ns) of each fired pulse, on the event loop's thread.
EdgeObserver = Callable[[str, int, int], object]


class GpioError(OSError):
    """The GPIO library is missing or refused the lines (an OSError: the CLI reports it plainly)."""


def import_gpio_library(module: str, what: str, extra: str) -> Any:
    """The GPIO library `what` (a config setting, e.g. "valves.type = 'jetson'") needs, or a GpioError
    that says how to get it.  Shared by every GPIO user: valves, strobe lines, the beam trigger."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise GpioError(f"{what} needs the {module} library: pip install 'sorterd[{extra}]' "
                        f"(on the target board)") from exc
    except Exception as exc:  # noqa: BLE001 -- Jetson.GPIO raises plain Exception/RuntimeError off its board
        raise GpioError(f"{what}: the {module} library is installed but would not load ({exc}): is this the "
                        "board it is for, and may this user open /dev/gpiochip*?") from exc


# -- drivers: the only code that touches the libraries ----------------------------------


class Driver(Protocol):
    def set(self, valve: str, on: bool) -> None: ...

    def all_off(self) -> None: ...

    def close(self) -> None: ...


class JetsonDriver:
    """Jetson.GPIO (RPi.GPIO-compatible API)."""

    def __init__(self, cfg: GpioLines, lib: Any = None, section: str = "valves") -> None:
        self.gpio = lib if lib is not None else import_gpio_library("Jetson.GPIO", f"[{section}] on Jetson.GPIO",
                                                                    "jetson")
        self.pins: dict[str, int] = {v: int(p) for v, p in cfg.pins.items()}
        self.on_level = self.gpio.LOW if cfg.active_low else self.gpio.HIGH
        self.off_level = self.gpio.HIGH if cfg.active_low else self.gpio.LOW
        self.gpio.setwarnings(False)
        self.gpio.setmode(getattr(self.gpio, cfg.numbering))
        for pin in self.pins.values():
            # Off from the first instant the line is an output.
            self.gpio.setup(pin, self.gpio.OUT, initial=self.off_level)

    def set(self, valve: str, on: bool) -> None:
        self.gpio.output(self.pins[valve], self.on_level if on else self.off_level)

    def all_off(self) -> None:
        for pin in self.pins.values():
            self.gpio.output(pin, self.off_level)

    def close(self) -> None:
        try:
            self.all_off()
        finally:
            self.gpio.cleanup(list(self.pins.values()))


class GpiodDriver:
    """libgpiod v2 Python bindings (gpiod >= 2.1): one request holds every valve line."""

    def __init__(self, cfg: GpioLines, lib: Any = None, section: str = "valves") -> None:
        self.gpiod = lib if lib is not None else import_gpio_library("gpiod", f"[{section}] on libgpiod", "gpiod")
        line = self.gpiod.line
        self.active, self.inactive = line.Value.ACTIVE, line.Value.INACTIVE
        self.lines: dict[str, int] = {v: int(p) for v, p in cfg.pins.items()}
        settings = self.gpiod.LineSettings(direction=line.Direction.OUTPUT, output_value=self.inactive,
                                           active_low=bool(cfg.active_low))
        try:
            self.request = self.gpiod.request_lines(
                cfg.chip, consumer=f"sorterd-{section}", config={tuple(self.lines.values()): settings})
        except OSError as exc:
            raise GpioError(f"{section}.chip = {cfg.chip!r}, lines {sorted(self.lines.values())}: {exc}") from exc

    def set(self, valve: str, on: bool) -> None:
        self.request.set_value(self.lines[valve], self.active if on else self.inactive)

    def all_off(self) -> None:
        self.request.set_values({off: self.inactive for off in self.lines.values()})

    def close(self) -> None:
        try:
            self.all_off()
        finally:
            self.request.release()


# -- real-time helpers -------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_CLOCK_MONOTONIC, _TIMER_ABSTIME, _PR_SET_TIMERSLACK = 1, 1, 29
_MCL_CURRENT, _MCL_FUTURE = 1, 2


def sleep_until_ns(t_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC reaches t_ns (absolute; the GIL is released meanwhile)."""
    if _LIBC is not None and hasattr(_LIBC, "clock_nanosleep"):
        ts = _Timespec(t_ns // 1_000_000_000, t_ns % 1_000_000_000)
        _LIBC.clock_nanosleep(_CLOCK_MONOTONIC, _TIMER_ABSTIME, ctypes.byref(ts), None)
        return
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


@dataclass
class RealtimeReport:
    fifo: bool = False
    mlock: bool = False
    timerslack: bool = False
    notes: list[str] = field(default_factory=list)


def make_realtime(priority: int, libc: Any = _LIBC,
                  setscheduler: Callable[..., None] | None = None) -> RealtimeReport:
    """Best-effort real-time setup of the calling thread; says what it got."""
    rep = RealtimeReport()
    if priority <= 0:
        rep.notes.append("rt_priority = 0: normal scheduling")
        return rep
    sched = setscheduler or getattr(os, "sched_setscheduler", None)
    try:
        if sched is None:
            raise OSError("sched_setscheduler not available")
        sched(0, os.SCHED_FIFO, os.sched_param(priority))  # 0 = this thread on Linux
        rep.fifo = True
    except (OSError, AttributeError) as exc:
        rep.notes.append(f"SCHED_FIFO not permitted ({exc}): edges may be late under load")
    if libc is not None:
        rep.mlock = libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) == 0
        if not rep.mlock:
            rep.notes.append(f"mlockall not permitted (errno {ctypes.get_errno()}): a page fault may delay an edge")
        rep.timerslack = libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    return rep


# -- the valve thread ---------------------------------------------------------------------


@dataclass
class _Job:
    """One pulse: its state is guarded by GpioValves._cond."""

    pulse: Pulse
    state: str = "queued"  # queued -> firing -> on -> done | refused | cancelled
    on_ns: int | None = None
    off_ns: int | None = None
    fut: asyncio.Future[PulseOutcome] | None = None  # loop thread only
    outcome: PulseOutcome | None = None  # loop thread only


@dataclass(order=True)
class _Edge:
    t_ns: int
    seq: int
    on: bool = field(compare=False)
    job: _Job = field(compare=False)


class GpioValves:
    def __init__(self, cfg: GpioLines, driver: Driver, clock: Clock, backend: str,
                 observer: EdgeObserver | None = None) -> None:
        if clock.virtual:
            raise GpioError(f"GPIO outputs ({backend}) drive real lines: they need the wall clock")
        self.cfg = cfg
        self.driver = driver
        self.clock = clock
        self.observer = observer  # called on the loop thread with each fired pulse's actual edges
        self.max_on_ns = int(cfg.max_on_ms * 1e6)
        self.late_limit_ns = int(cfg.late_limit_us * 1e3)
        self.spin_ns = int(cfg.spin_us * 1e3)
        self.stats_ = ValveStats(backend)
        self.realtime: RealtimeReport | None = None
        self._cond = threading.Condition()
        self._heap: list[_Edge] = []  # guarded by _cond
        self._seq = itertools.count()
        self._stopping = False  # guarded by _cond
        self._failed: str | None = None  # set by the valve thread, read by the loop
        self._jobs: dict[Pulse, _Job] = {}  # loop thread only
        self._loop = asyncio.get_running_loop()
        self._old_switch = sys.getswitchinterval()
        if cfg.switch_interval_us > 0:
            sys.setswitchinterval(cfg.switch_interval_us * 1e-6)
        self._thread = threading.Thread(target=self._run, name=f"sorterd-valves-{backend}", daemon=True)
        close_at_exit(self)
        self._thread.start()

    # -- loop thread ----------------------------------------------------------

    def schedule(self, pulse: Pulse) -> str | None:
        if self._failed:
            return self.stats_.refuse("valve thread failed", self._failed)
        lead = pulse.start_ns - time.monotonic_ns()
        if lead < self.cfg.min_lead_ms * 1e6:
            return self.stats_.refuse("late", f"start {lead / 1e6:.2f} ms ahead, needs {self.cfg.min_lead_ms:.2f} ms")
        if pulse.duration_ns <= 0 or pulse.duration_ns > self.max_on_ns:
            return self.stats_.refuse("bad duration", f"{pulse.duration_ns / 1e6:.2f} ms, max on {self.cfg.max_on_ms} ms")
        job = _Job(pulse)
        with self._cond:
            if self._stopping:
                return self.stats_.refuse("valves closed")
            if any(e.job.pulse.valve == pulse.valve and e.job.state in ("queued", "on")
                   and e.job.pulse.start_ns < pulse.end_ns and pulse.start_ns < e.job.pulse.end_ns
                   for e in self._heap):
                return self.stats_.refuse("overlap")
            heapq.heappush(self._heap, _Edge(pulse.start_ns, next(self._seq), True, job))
            self._cond.notify()
        self._jobs[pulse] = job
        return None

    def cancel(self, pulse: Pulse) -> bool:
        job = self._jobs.get(pulse)
        if job is None:
            return False
        with self._cond:
            if job.state != "queued":
                return False  # the thread has it: it fires
            job.state = "cancelled"
            self._cond.notify()
        self._finish(job, PulseOutcome(pulse, False, None, None, "cancelled"))
        return True

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        job = self._jobs.get(pulse)
        if job is None:
            raise KeyError(f"pulse for {pulse.stone_id} was never scheduled")
        if job.outcome is not None:
            self._jobs.pop(pulse, None)
            return job.outcome
        if job.fut is None:
            job.fut = self._loop.create_future()
        try:
            return await asyncio.shield(job.fut)
        finally:
            self._jobs.pop(pulse, None)

    def _finish(self, job: _Job, outcome: PulseOutcome) -> None:
        if job.outcome is not None:
            return
        job.outcome = outcome
        if outcome.fired and outcome.actual_on_ns is not None and outcome.actual_off_ns is not None:
            self.stats_.fired(job.pulse.start_ns, outcome.actual_on_ns)
            self.stats_.fired(job.pulse.end_ns, outcome.actual_off_ns)
            if self.observer is not None:
                self.observer(job.pulse.valve, outcome.actual_on_ns, outcome.actual_off_ns)
        elif outcome.status.startswith("refused"):
            self.stats_.refuse("late at fire")
        if job.fut is not None and not job.fut.done():
            job.fut.set_result(outcome)

    def stats(self) -> ValveStats:
        self.stats_.state = "failed" if self._failed else ("closed" if self._stopping else "ready")
        return self.stats_

    def close(self) -> None:
        with self._cond:
            if self._stopping and not self._thread.is_alive():
                return
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=2.0)
        self._safe_all_off()  # whatever the thread managed, the lines end up off
        try:
            self.driver.close()
        except Exception:  # noqa: BLE001 -- off already; releasing is best effort
            log.exception("releasing the valve lines failed")
        sys.setswitchinterval(self._old_switch)
        for job in list(self._jobs.values()):
            self._finish(job, PulseOutcome(job.pulse, False, None, None, "cancelled: valves closed"))
        closed(self)

    # -- valve thread ----------------------------------------------------------

    def _run(self) -> None:
        self.realtime = make_realtime(self.cfg.rt_priority)
        for note in self.realtime.notes:
            log.log(logging.WARNING if self.cfg.rt_priority else logging.INFO, "valve thread: %s", note)
        try:
            while (edge := self._next_edge()) is not None:
                self._sleep_until(edge.t_ns - self.spin_ns)
                self._spin_and_fire(edge.t_ns)
        except BaseException as exc:  # noqa: BLE001 -- the lines must go off, whatever happened
            self._failed = f"{type(exc).__name__}: {exc}"
            log.exception("valve thread failed: all valves off, pulses refused from now on")
        finally:
            self._safe_all_off()

    def _next_edge(self) -> _Edge | None:
        """Block until the earliest edge is near (or we stop); peek it."""
        with self._cond:
            while not self._stopping:
                while self._heap and self._heap[0].job.state == "cancelled":
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(0.5)
                    continue
                wait = self._heap[0].t_ns - time.monotonic_ns()
                if wait <= NEAR_NS:
                    return self._heap[0]
                self._cond.wait((wait - NEAR_NS) / 1e9)
            return None

    @staticmethod
    def _sleep_until(t_ns: int) -> None:
        if t_ns > time.monotonic_ns():
            sleep_until_ns(t_ns)  # the GIL is free while we sleep; we hold it again on return

    def _spin_and_fire(self, t_ns: int) -> None:
        """The last few hundred us: a sleeping thread wakes too late, so spin.

        While spinning we keep the GIL: with the normal switch interval another
        thread's request would take it from us right before the edge.  Other
        threads wait at most spin_us (those in C code releasing the GIL -- I/O,
        OpenCV, onnxruntime -- not at all)."""
        interval = sys.getswitchinterval()
        sys.setswitchinterval(HOLD_GIL_S)
        try:
            while time.monotonic_ns() < t_ns:
                pass
            self._fire_due()
        finally:
            sys.setswitchinterval(interval)

    def _fire_due(self) -> None:
        now = time.monotonic_ns()
        with self._cond:
            due = []
            while self._heap and self._heap[0].t_ns <= now:
                edge = heapq.heappop(self._heap)
                if edge.on and edge.job.state == "queued":
                    edge.job.state = "firing"  # cancel() can no longer take it
                    due.append(edge)
                elif not edge.on and edge.job.state == "on":
                    due.append(edge)
        for edge in due:
            self._on_edge(edge) if edge.on else self._off_edge(edge)

    def _on_edge(self, edge: _Edge) -> None:
        job = edge.job
        late = time.monotonic_ns() - edge.t_ns
        if late > self.late_limit_ns:
            with self._cond:
                job.state = "refused"
            self._post(job, PulseOutcome(job.pulse, False, None, None,
                                         f"refused: late at fire ({late / 1e3:.0f} us after its start)"))
            return
        self.driver.set(job.pulse.valve, True)
        job.on_ns = time.monotonic_ns()  # after the write: the actual edge
        off_at = min(job.pulse.end_ns, job.on_ns + self.max_on_ns)
        with self._cond:
            job.state = "on"
            heapq.heappush(self._heap, _Edge(off_at, next(self._seq), False, job))

    def _off_edge(self, edge: _Edge) -> None:
        job = edge.job
        self.driver.set(job.pulse.valve, False)
        job.off_ns = time.monotonic_ns()
        with self._cond:
            job.state = "done"
        assert job.on_ns is not None
        self._post(job, PulseOutcome(job.pulse, True, job.on_ns, job.off_ns, "fired"))

    def _post(self, job: _Job, outcome: PulseOutcome) -> None:
        try:
            self._loop.call_soon_threadsafe(self._finish, job, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _safe_all_off(self) -> None:
        try:
            self.driver.all_off()
        except Exception:  # noqa: BLE001 -- log it; there is nothing else left to try
            log.exception("could not switch the valves off")


def open_gpio_valves(cfg: GpioLines, clock: Clock, observer: EdgeObserver | None = None, lib: Any = None) -> GpioValves:
    """The valves' lines on Jetson.GPIO or libgpiod (lib: a stand-in for the library, in tests).

    observer: told each fired pulse's actual edges; the composition root passes
    the simulated machine's jets when the lines drive a simulated machine.
    """
    driver: Driver = JetsonDriver(cfg, lib) if cfg.library == "jetson" else GpiodDriver(cfg, lib)
    if set(cfg.pins) != set(JET_BINS):
        raise GpioError(f"valves.pins needs exactly {', '.join(JET_BINS)}")
    try:
        return GpioValves(cfg, driver, clock, cfg.library, observer)
    except BaseException:
        driver.close()
        raise
