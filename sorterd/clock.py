"""Host time, and the virtual clock the simulator runs on.

Every timestamp in sorterd is host monotonic nanoseconds (`Clock.now_ns`).
Camera, controller and simulator clocks are converted to it at the edge.

Two clocks share one interface:

* `WallClock` -- `time.monotonic_ns()`; the daemon on real hardware, and the
  simulator when latency is what we measure.
* `VirtualClock` -- wall time plus an offset that grows whenever the event loop
  would sit idle.  `VirtualTimeLoop` skips those idle stretches instantly, so
  a 50-second simulated run takes only as long as its computing does, while
  compute time itself still passes at real speed (deadlines stay honest: a
  slow inference still makes a stone late).  The loop counts outstanding
  executor jobs; while a worker thread is busy it never jumps.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

R = TypeVar("R")


class Clock:
    """Host monotonic time in ns, and sleeping until an absolute instant."""

    virtual = False

    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_until(self, t_ns: int) -> None:
        delay = (t_ns - self.now_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()


class WallClock(Clock):
    """The real clock."""


class VirtualClock(Clock):
    """Wall time plus skipped idle time; only meaningful with its own loop."""

    virtual = True

    def __init__(self) -> None:
        # Written only by the loop thread (VirtualTimeLoop._skip); read by any
        # thread.  A Python int read is atomic, so no lock is needed.
        self.offset_ns = 0

    def now_ns(self) -> int:
        return time.monotonic_ns() + self.offset_ns

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return VirtualTimeLoop(self)


class _SkippingSelector(selectors.BaseSelector):
    """Wraps the loop's selector: an idle wait becomes an instant time skip."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is not None and self._loop.idle():
            self._loop.skip(timeout)
            return []
        return self._inner.select(timeout)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def close(self) -> None:
        self._inner.close()

    def get_map(self) -> Any:
        return self._inner.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose time is a `VirtualClock`."""

    def __init__(self, clock: VirtualClock) -> None:
        self._vclock = clock
        self._busy = 0  # outstanding executor jobs; loop thread only
        super().__init__(_SkippingSelector(selectors.DefaultSelector(), self))

    def time(self) -> float:
        return self._vclock.now_ns() / 1e9

    def idle(self) -> bool:
        return self._busy == 0

    def skip(self, seconds: float) -> None:
        self._vclock.offset_ns += max(0, int(seconds * 1e9) + 1)

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., R], *args: Any
    ) -> asyncio.Future[R]:
        fut = super().run_in_executor(executor, func, *args)
        self._busy += 1
        # Decrement in the loop thread once the result has arrived, so the
        # loop cannot skip time between the worker finishing and the loop
        # seeing it.
        fut.add_done_callback(self._job_done)
        return fut

    def _job_done(self, _fut: asyncio.Future[Any]) -> None:
        self._busy -= 1


def make_clock(kind: str) -> Clock:
    if kind == "virtual":
        return VirtualClock()
    if kind == "wall":
        return WallClock()
    raise ValueError(f"unknown clock {kind!r}: choose 'wall' or 'virtual'")
