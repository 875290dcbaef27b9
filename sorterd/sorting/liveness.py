"""Is every stage alive?  The systemd watchdog is pinged only while it is.

A stage shows the watchdog a `Beat`: how much work waits for it (a capture under way, a
pair in the workers, rows the record writer has not taken, pulses whose outcome has not
come back) and a counter of work done (or, for a writer thread, of its loop turning).  A
stage is *stuck* when work waits and the counter has not moved for `stall_s`; a stage with
nothing waiting is idle, never stuck (a sorter with no stones keeps pinging).

`keep_alive` sends WATCHDOG=1 every `period_s` while no stage is stuck.  Once one is, the
pings stop, the log and systemd's STATUS= name the stage, and systemd's WatchdogSec
(longer than stall_s: systemd/sorterd.service) restarts the sorter.  A camera that is away
but whose reopen fails quickly is not stuck (the sorter is retrying, and counts the gap);
a camera read that never returns is.

Time here is the host's monotonic wall time, as systemd's watchdog counts it, whatever
clock the pipeline runs on.  Threads: `Liveness` counters are written by the loop thread;
the recorder's by its writer thread (int updates are atomic under the GIL); `Watchdog`
runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

PING_PERIOD_S = 0.25


@dataclass(frozen=True)
class Beat:
    waiting: int  # work waiting for the stage (0: idle)
    done: int  # grows whenever the stage gets anything done


class Stage(Protocol):
    """What the watchdog reads of a stage."""

    @property
    def name(self) -> str: ...

    def beat(self) -> Beat: ...


class Liveness:
    """A loop-owned stage's counters: `begin` when work reaches it, `end` when it is done."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.waiting = 0
        self.done = 0

    @property
    def name(self) -> str:
        return self._name

    def begin(self) -> None:
        self.waiting += 1

    def end(self) -> None:
        self.waiting -= 1
        self.done += 1

    def beat(self) -> Beat:
        return Beat(self.waiting, self.done)


class Watchdog:
    """Which stages are stuck: work waiting and no progress for `stall_s`."""

    def __init__(self, stages: Sequence[Stage], stall_s: float) -> None:
        self.stages = list(stages)
        self.stall_s = stall_s
        self._last: dict[str, tuple[int, float]] = {}  # name -> (done, when it last moved or was idle)

    def stuck(self, now_s: float) -> list[tuple[str, float]]:
        """(stage, seconds without progress) of each stuck stage."""
        out = []
        for stage in self.stages:
            beat = stage.beat()
            done, since = self._last.get(stage.name, (beat.done, now_s))
            if beat.done != done or beat.waiting <= 0:
                since = now_s
            self._last[stage.name] = (beat.done, since)
            if now_s - since >= self.stall_s:
                out.append((stage.name, now_s - since))
        return out


def describe(stuck: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} (no progress for {secs:.1f} s with work waiting)" for name, secs in stuck)


async def keep_alive(watchdog: Watchdog, notify: Callable[[str], bool], period_s: float = PING_PERIOD_S,
                     now: Callable[[], float] = time.monotonic) -> None:
    """Ping systemd's watchdog while no stage is stuck; say which one is when one is."""
    reported: list[str] = []
    while True:
        await asyncio.sleep(period_s)
        stuck = watchdog.stuck(now())
        names = [name for name, _ in stuck]
        if not stuck:
            if reported:
                log.warning("watchdog: %s moving again: pinging systemd's watchdog again", ", ".join(reported))
                notify("STATUS=sorting")
            notify("WATCHDOG=1")
        elif names != reported:
            what = describe(stuck)
            log.error("watchdog: stuck stage: %s: no more watchdog pings, systemd restarts the sorter", what)
            notify(f"STATUS=stuck: {what}; systemd's watchdog restarts the sorter")
        reported = names
