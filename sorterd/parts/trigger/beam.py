"""`beam` trigger: a break-beam sensor's edge on a GPIO line.

Two libraries (`[trigger] library`):

* `gpiod` (libgpiod v2 Python bindings, gpiod >= 2.1).  The line is requested
  as an input with edge detection on BOTH edges, the configured bias, and
  `event_clock = gpiod.line.Clock.MONOTONIC`: the kernel stamps each edge in
  its hard-IRQ handler with CLOCK_MONOTONIC, the very clock behind
  `time.monotonic_ns()` and `WallClock.now_ns()`, so the timestamp is the edge
  itself, give or take the IRQ entry latency (µs), however late Python reads it.
  Both edges are requested so that debouncing can see the beam *clearing*: the
  bounce when a stone leaves the beam (clear, broken-for-20-µs, clear) would
  otherwise look like a new stone once the break lasted longer than the holdoff.
  Debounce is done here, in software, on the kernel timestamps.  The kernel's
  own debouncer (`debounce_period`) is deliberately NOT used by default: where
  the GPIO controller has no hardware debounce (Raspberry Pi, most SoCs) the
  kernel debounces in a work queue and stamps the edge when that work runs --
  debounce period rounded UP to a jiffy (1-10 ms) plus scheduling delay after
  the edge -- and drops a break shorter than that period altogether (it reads
  the level when the timer expires).  `BeamTrigger(..., kernel_debounce=True)`
  asks for it anyway (timestamps then lag; calibrate `latency_ms`).
* `jetson` (Jetson.GPIO).  `add_event_detect` on the break edge only; the
  library calls back from its own event thread with no timestamp, so the
  callback stamps `clock.now_ns()` (= time.monotonic_ns()) as its first
  statement.  That adds the callback thread's wake-up latency, typically
  0.1-1 ms and more under load, to every timestamp: prefer `gpiod` (the kernel
  timestamp) where the board has it.  Software debounce as for gpiod, on these
  stamps (only break edges are visible here).  Opening takes ~1 s (the library
  sleeps in add_event_detect until its thread is up).

Filtering, in order, for every edge (`_edge`): an edge closer than
`debounce_us` to the previous edge of either kind is bounce (`bounced`); a
clearing edge is then just remembered; a break edge within `holdoff_ms` of the
last accepted trigger is the same stone flickering (`suppressed`); anything
else is a trigger at `t_edge - latency_ms`.

Threads:

* gpiod: ONE daemon reader thread owns the line request.  It blocks in
  `request.wait_edge_events(POLL_S)` (a select() on the request's fd, GIL
  released), reads the events, filters them and hands each trigger to the
  event loop with `loop.call_soon_threadsafe`.  Counters it writes are written
  by no other thread.  If the request fails (OSError from the chip: device
  removed, ...), the thread logs it, releases the request and re-requests the
  line with exponential backoff (RETRY_MIN_S .. RETRY_MAX_S) until it works
  (`reopens`) or the trigger is closed.  It never dies and never takes the
  daemon down.  While the line is down there are simply no triggers: the
  stones pass unseen and fall to REJECT along the default trajectory.
* jetson: Jetson.GPIO's own event thread runs the callback.  That thread is
  the library's: if it fails, the library prints the error and there are no
  more triggers (no reopen); use `gpiod` where this matters.
* The event loop thread: `next()`, `close()`, `stats()`, and `_deliver`, which
  puts triggers into a bounded asyncio.Queue; a full queue (nobody reading
  `next()`) drops the newest trigger, counts it in `dropped` and logs it.
  Edges the kernel lost (its event buffer overflowed: gaps in `line_seqno`)
  are counted in `dropped` too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.controller.gpio import GpioError, GpioLibraryOptions, import_gpio_library
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.trigger import TriggerEvent, TriggerOptions

log = logging.getLogger(__name__)

CONSUMER = "sorterd-trigger"
_BIAS = {"as_is": "AS_IS", "pull_up": "PULL_UP", "pull_down": "PULL_DOWN", "disabled": "DISABLED"}
_HINTS = {
    errno.ENOENT: "no such GPIO chip: list them with `gpiodetect` (or ls /dev/gpiochip*)",
    errno.EBUSY: "the line is busy: another process or a kernel driver holds it (`gpioinfo` names the consumer)",
    errno.EACCES: "permission denied: run as a user in the group owning /dev/gpiochip* (usually 'gpio')",
    errno.EPERM: "permission denied: run as a user in the group owning /dev/gpiochip* (usually 'gpio')",
    errno.EINVAL: "the chip refused the settings: is trigger.pin a line offset of this chip (`gpioinfo`), "
                  "and does it support this bias and edge detection?",
    errno.ENODEV: "the chip went away (device removed?)",
    errno.ENXIO: "the line cannot raise interrupts: choose another line for the sensor",
}


@dataclass(frozen=True)
class BeamTriggerConfig(GpioLibraryOptions, TriggerOptions):
    type: str = opt("beam", "Backend: beam -- a break-beam sensor's edge on a GPIO line, time-stamped by the kernel "
                    "(gpiod) or on arrival (jetson: stamped when the callback runs).", choices=("beam",))
    pin: int = opt(25, "The sensor's line (gpiod offset or Jetson header pin).", minval=0, maxval=1023)
    broken_level: str = opt("low", "Line level while the beam is broken (NPN / open-collector sensors with a pull-up: low).",
                            choices=("low", "high"))
    bias: str = opt("pull_up", "Line bias (gpiod only; Jetson header pins have fixed pulls).",
                    choices=("as_is", "pull_up", "pull_down", "disabled"))
    debounce_us: float = opt(200.0, "Edges closer than this to the previous one are contact/optical bounce.",
                             minval=0.0, maxval=100_000.0)
    holdoff_ms: float = opt(5.0, "After a trigger, ignore further breaks this long (one stone's flicker is one stone).",
                            minval=0.0, maxval=1000.0)
    latency_ms: float = opt(0.0, "Sensor response time, subtracted from each edge's timestamp.", minval=0.0, maxval=20.0)
    beam_x_mm: float = opt(10.0, "Where the beam crosses the channel, from the camera view's left edge.", minval=0.0)

    @property
    def front_mm(self) -> float | None:
        return self.beam_x_mm

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        if sections["camera"].type == "sim":
            return ["trigger.type = 'beam' reads a real sensor, which the simulated machine's stones never break: "
                    "use trigger.type = 'sim' or 'vision' with camera.type = 'sim'"]
        return []


class BeamTrigger:
    """A break-beam sensor on a GPIO line (see the module docstring)."""

    POLL_S = 0.1  # reader thread: wake this often to notice close() (close waits at most this)
    RETRY_MIN_S = 0.1  # first re-request after a line failure ...
    RETRY_MAX_S = 5.0  # ... doubling up to this

    def __init__(self, cfg: BeamTriggerConfig, clock: Clock, lib: Any = None, queue_size: int = 64,
                 kernel_debounce: bool = False) -> None:
        """Opens the line; raises GpioError when it cannot (lib: a stand-in for the library, in tests).

        Needs a running event loop (it is opened from the daemon's loop, like every part).
        """
        if clock.virtual:
            raise GpioError("trigger.type = 'beam' reads a real sensor: it needs the wall clock, "
                            "not the simulator's virtual clock")
        if cfg.library not in ("gpiod", "jetson"):
            raise GpioError(f"trigger.library = {cfg.library!r}: allowed are 'gpiod' and 'jetson'")
        self.cfg = cfg
        self.clock = clock
        self.library = cfg.library
        self.kernel_debounce = bool(kernel_debounce) and cfg.library == "gpiod"
        self.latency_ns = round(cfg.latency_ms * 1e6)
        self.holdoff_ns = round(cfg.holdoff_ms * 1e6)
        # Software debounce unless the kernel does it (then a second pass would only drop real edges).
        self.debounce_ns = 0 if self.kernel_debounce else round(cfg.debounce_us * 1e3)
        self.where = (f"trigger.chip = {cfg.chip!r}, trigger.pin = {cfg.pin}" if cfg.library == "gpiod"
                      else f"trigger.numbering = {cfg.numbering!r}, trigger.pin = {cfg.pin}")
        # Counters: each is written by one thread only (the edge thread, or the loop for _queue_dropped).
        self.edges = 0
        self.triggers = 0
        self.suppressed = 0
        self.bounced = 0
        self.reopens = 0
        self._queue_dropped = 0
        self._kernel_lost = 0
        self._last_edge_ns: int | None = None
        self._last_trigger_ns: int | None = None
        self._last_drop_log = 0.0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TriggerEvent | None] = asyncio.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._closed = False  # loop thread
        self._thread: threading.Thread | None = None
        self._request: Any = None  # gpiod: owned by the reader thread once it runs
        if cfg.library == "gpiod":
            self.lib = lib if lib is not None else import_gpio_library(
                "gpiod", f"{self.where}: trigger.library = 'gpiod'", "gpiod")
            edge_type = self.lib.EdgeEvent.Type
            self._broken_type = edge_type.FALLING_EDGE if cfg.broken_level == "low" else edge_type.RISING_EDGE
            self._settings = self._gpiod_settings()
            self._request = self._gpiod_request()  # GpioError if it cannot
            self._thread = threading.Thread(target=self._gpiod_run, name="sorterd-trigger-beam", daemon=True)
            self._thread.start()
        else:
            self.lib = lib if lib is not None else import_gpio_library(
                "Jetson.GPIO", f"{self.where}: trigger.library = 'jetson'", "jetson")
            self._jetson_open()

    # -- loop thread ---------------------------------------------------------------------

    async def next(self) -> TriggerEvent | None:
        """The next trigger; None only once close() was called (a real sensor never runs out)."""
        if self._closed:
            return None
        ev = await self._queue.get()
        if ev is None:
            self._queue.put_nowait(None)  # keep the end marker for any other waiter
        return ev

    def close(self) -> None:
        """Stop the reader (within POLL_S), release the line, end a pending next() with None."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.library == "gpiod":
            assert self._thread is not None
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                log.warning("beam trigger: the reader thread did not stop within 2 s; it releases the line when it does")
        else:
            self._jetson_close()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._end_waiters()
        else:
            try:
                self._loop.call_soon_threadsafe(self._end_waiters)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    def set_reference(self, backlit: np.ndarray) -> None:
        """A beam does not look at frames: nothing to do."""

    def stats(self) -> dict[str, int]:
        """edges seen (both kinds), triggers accepted, break edges within the holdoff (suppressed),
        edges rejected as bounce, triggers lost (queue full, kernel buffer overflow), line re-requests."""
        return {"edges": self.edges, "triggers": self.triggers, "suppressed": self.suppressed,
                "bounced": self.bounced, "dropped": self._queue_dropped + self._kernel_lost,
                "reopens": self.reopens}

    def _end_waiters(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def _deliver(self, t_ns: int) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(TriggerEvent(t_ns))
        except asyncio.QueueFull:
            self._queue_dropped += 1
            now = time.monotonic()
            if self._queue_dropped == 1 or now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                log.warning("beam trigger: %d triggers queued and nobody reading them: trigger dropped "
                            "(%d dropped so far)", self._queue.qsize(), self._queue_dropped)

    # -- the edge filter (the edge thread) -----------------------------------------------

    def _edge(self, t_ns: int, broken: bool) -> None:
        """One edge at host monotonic t_ns; broken: the beam became broken (else it cleared)."""
        self.edges += 1
        prev, self._last_edge_ns = self._last_edge_ns, t_ns
        if self.debounce_ns and prev is not None and t_ns - prev < self.debounce_ns:
            self.bounced += 1
            return
        if not broken:
            return
        if self._last_trigger_ns is not None and t_ns - self._last_trigger_ns < self.holdoff_ns:
            self.suppressed += 1
            return
        self._last_trigger_ns = t_ns
        self.triggers += 1
        self._post(self._deliver, t_ns - self.latency_ns)

    def _post(self, fn: Callable[[int], None], arg: int) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            self._stop.set()  # the loop is closed: nobody will read triggers again

    # -- gpiod -----------------------------------------------------------------------------

    def _gpiod_settings(self) -> Any:
        line = self.lib.line
        period = timedelta(microseconds=self.cfg.debounce_us) if self.kernel_debounce else timedelta(0)
        return self.lib.LineSettings(
            direction=line.Direction.INPUT,
            edge_detection=line.Edge.BOTH,  # both: the clearing edge is needed to debounce (module docstring)
            bias=getattr(line.Bias, _BIAS[self.cfg.bias]),
            debounce_period=period,
            event_clock=line.Clock.MONOTONIC,  # kernel timestamps on time.monotonic_ns()'s clock
        )

    def _gpiod_request(self) -> Any:
        try:
            req = self.lib.request_lines(self.cfg.chip, consumer=CONSUMER, config={self.cfg.pin: self._settings})
        except (OSError, ValueError) as exc:
            hint = _HINTS.get(getattr(exc, "errno", None) or 0, "check trigger.chip and trigger.pin (`gpioinfo`)")
            raise GpioError(f"{self.where}: cannot request the sensor line as an input with edge detection: "
                            f"{exc} -- {hint}") from exc
        self._last_seqno = 0  # line_seqno restarts at 1 with every request
        return req

    def _gpiod_run(self) -> None:
        req = self._request
        backoff = self.RETRY_MIN_S
        attempts = 0
        down_since = 0.0
        last_warn = 0.0
        try:
            while not self._stop.is_set():
                if req is None:
                    try:
                        req = self._request = self._gpiod_request()
                    except Exception as exc:  # noqa: BLE001 -- GpioError, or anything: keep retrying
                        attempts += 1
                        now = time.monotonic()
                        if attempts <= 3 or now - last_warn >= 60.0:
                            last_warn = now
                            log.warning("beam trigger: line still down after %.0f s (%s); no triggers, stones go to "
                                        "REJECT; retrying in %.1f s", now - down_since, exc, backoff)
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, self.RETRY_MAX_S)
                        continue
                    self.reopens += 1
                    log.warning("beam trigger: %s re-requested after %.1f s down: triggers resume",
                                self.where, time.monotonic() - down_since)
                    backoff, attempts = self.RETRY_MIN_S, 0
                try:
                    if req.wait_edge_events(self.POLL_S):
                        for ev in req.read_edge_events():
                            self._gpiod_event(ev)
                except Exception as exc:  # noqa: BLE001 -- OSError from a removed chip, or anything: recover
                    if self._stop.is_set():
                        break
                    log.error("beam trigger: reading %s failed (%s: %s): no triggers until the line is back; "
                              "re-requesting it", self.where, type(exc).__name__, exc)
                    self._release(req)
                    req = self._request = None
                    down_since = time.monotonic()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.RETRY_MAX_S)
        finally:
            if req is not None:
                self._release(req)
                self._request = None

    def _gpiod_event(self, ev: Any) -> None:
        lost = ev.line_seqno - self._last_seqno - 1
        if lost > 0 and self._last_seqno:
            self._kernel_lost += lost
            log.warning("beam trigger: the kernel's event buffer overflowed: %d edges lost", lost)
        self._last_seqno = ev.line_seqno
        self._edge(ev.timestamp_ns, ev.event_type == self._broken_type)

    def _release(self, req: Any) -> None:
        try:
            req.release()
        except Exception:  # noqa: BLE001 -- a dead chip may refuse even this; the fd goes with the object
            log.debug("beam trigger: releasing the line request failed", exc_info=True)

    # -- Jetson.GPIO -----------------------------------------------------------------------

    def _jetson_open(self) -> None:
        gpio = self.lib
        edge = gpio.FALLING if self.cfg.broken_level == "low" else gpio.RISING
        # The library's bouncetime (whole ms, wall clock) never drops more than ours (µs, monotonic).
        bounce_ms = int(self.cfg.debounce_us // 1000) or None
        try:
            gpio.setwarnings(False)
            gpio.setmode(getattr(gpio, self.cfg.numbering))
            gpio.setup(self.cfg.pin, gpio.IN)
            gpio.add_event_detect(self.cfg.pin, edge, callback=self._jetson_callback, bouncetime=bounce_ms)
        except (OSError, ValueError, RuntimeError) as exc:
            try:
                gpio.cleanup(self.cfg.pin)
            except Exception:  # noqa: BLE001 -- the original error is the one to report
                pass
            raise GpioError(f"{self.where}: Jetson.GPIO cannot watch the sensor pin: {exc} -- check that the "
                            f"pin exists in {self.cfg.numbering} numbering, is a GPIO (not a power or "
                            f"special-function pin) and is not used by another process") from exc

    def _jetson_callback(self, channel: Any) -> None:
        t_ns = self.clock.now_ns()  # first: this thread's wake-up latency is already in it (no kernel stamp)
        if not self._stop.is_set():
            self._edge(t_ns, True)

    def _jetson_close(self) -> None:
        for fn, args in ((self.lib.remove_event_detect, (self.cfg.pin,)), (self.lib.cleanup, (self.cfg.pin,))):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 -- release what can be released
                log.exception("beam trigger: Jetson.GPIO %s(%s) failed", fn.__name__, self.cfg.pin)


def _open(cfg: BeamTriggerConfig, opening: Opening) -> BeamTrigger:
    return BeamTrigger(cfg, opening.clock)


BACKEND = Backend("trigger", "beam", BeamTriggerConfig, _open)
