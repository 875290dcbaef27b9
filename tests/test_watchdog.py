"""The systemd watchdog is pinged only while every stage moves or is idle (sorting/liveness.py).

The pipeline runs on the small fakes of test_pipeline_fakes, on the wall clock (systemd's
watchdog counts wall time), with one part wedged: a worker that never returns, a camera read
that hangs, a record writer stuck inside the disk, valves that never report.  A fake notifier
counts the WATCHDOG=1 pings: they must stop, and STATUS= must name the stuck stage; a sorter
with no stones must keep pinging.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pipeline_fakes import STONES, FakeCamera, FakeLights, FakeModel, FakeTrigger, FakeValves, Stone

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.clock import Clock, WallClock
from sorterd.controller.outputs import Pulse, PulseOutcome
from sorterd.metrics import Metrics
from sorterd.parts import Parts
from sorterd.parts.camera import Frame
from sorterd.parts.inference import Prediction
from sorterd.parts.trigger import TriggerEvent
from sorterd.sorting.liveness import Beat, Liveness, Watchdog, keep_alive
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder, open_db

STALL_S = 0.4  # short, so the test is; the production default is service.stall_s
PERIOD_S = 0.05
RUN_S = 1.6  # long enough for a stall to be seen with room to spare on a loaded machine


@dataclass
class Notifier:
    """sdnotify.notify's stand-in: every message, with when it was sent."""

    sent: list[tuple[float, str]] = field(default_factory=list)

    def __call__(self, state: str) -> bool:
        self.sent.append((time.monotonic(), state))
        return True

    def pings_after(self, t: float) -> int:
        return sum(1 for when, s in self.sent if when >= t and s == "WATCHDOG=1")

    def statuses(self) -> list[str]:
        return [s for _, s in self.sent if s.startswith("STATUS=")]


# -- the wedged parts ------------------------------------------------------------


class Gate:
    """Something that never comes back until the test is over."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.entered = threading.Event()

    def block(self) -> None:
        self.entered.set()
        self.event.wait(30.0)


class WedgedModel(FakeModel):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def predict_halves(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        self.gate.block()  # a worker that never returns (a wedged onnxruntime call)
        return super().predict_halves(crops)


@dataclass
class HangingCamera(FakeCamera):
    grabs_before_hang: int = 2  # one pair, then the read hangs

    async def grab(self, mode: str, t_ns: int) -> Frame:
        if len(self.grabs) >= self.grabs_before_hang:
            await asyncio.Event().wait()  # a camera read that never returns
        return await super().grab(mode, t_ns)


@dataclass
class SilentValves(FakeValves):
    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        await asyncio.Event().wait()  # the controller never reports
        raise AssertionError("unreachable")


@dataclass
class NoTrigger:
    """An idle channel: no stone ever comes."""

    async def next(self) -> TriggerEvent | None:
        await asyncio.Event().wait()
        return None

    def set_reference(self, backlit: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def hung_disk(gate: Gate) -> Any:
    """A batch database whose writes never return (a hung SD card)."""
    def connect(path: Path) -> sqlite3.Connection:
        class Hung(sqlite3.Connection):
            def executemany(self, sql: str, params: Any, /) -> sqlite3.Cursor:
                gate.block()
                return super().executemany(sql, params)
        return open_db(path, Hung)
    return connect


# -- the run ---------------------------------------------------------------------


@dataclass
class Watched:
    notifier: Notifier
    started: float
    stats: Any


def watch(tmp_path: Path, *, camera: type[FakeCamera] = FakeCamera, valves: type[FakeValves] = FakeValves,
          model: FakeModel | None = None, trigger: Any = None, connect: Any = None, gate: Gate | None = None) -> Watched:
    """Run the pipeline over the fakes' stones for RUN_S of wall time with the watchdog pinger."""
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False}})
    clock: Clock = WallClock()
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    notifier = Notifier()

    async def main() -> Watched:
        t0 = clock.now_ns() + 50_000_000
        stones = [Stone(t0 + s.edge_ns, s.size_mm, s.y_mm, s.top, s.twin_mm) for s, _ in STONES]
        parts = Parts(camera=camera(stones, clock), lights=FakeLights(),
                      trigger=trigger or FakeTrigger([s.edge_ns for s in stones], clock), valves=valves(clock))
        recorder = Recorder(tmp_path, 0.01, 100, 0, connect=connect, close_timeout_s=0.5)
        pipeline = Pipeline(cfg, clock, parts, model or FakeModel(), recorder, Metrics())  # type: ignore[arg-type]
        dog = Watchdog([*pipeline.liveness(), recorder], STALL_S)
        started = time.monotonic()
        tasks = [asyncio.create_task(pipeline.run()), asyncio.create_task(keep_alive(dog, notifier, PERIOD_S))]
        try:
            await asyncio.sleep(RUN_S)
        finally:
            for t in tasks:
                t.cancel()
            if gate is not None:
                gate.event.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            recorder.close()
        return Watched(notifier, started, pipeline.stats)

    try:
        return loop.run_until_complete(main())
    finally:
        if gate is not None:
            gate.event.set()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def assert_stopped_naming(w: Watched, stage: str) -> None:
    # Pinging while the stage still moved, none once it had been stuck for STALL_S (plus a
    # generous margin for a loaded machine), and systemd told which stage it is.
    assert w.notifier.pings_after(w.started) > 0
    assert w.notifier.pings_after(w.started + RUN_S - 0.5) == 0, w.notifier.sent[-5:]
    stuck = [s for s in w.notifier.statuses() if s.startswith("STATUS=stuck")]
    assert stuck and stuck[-1].startswith(f"STATUS=stuck: {stage} (no progress for"), w.notifier.statuses()


def test_a_wedged_worker_stops_the_pings(tmp_path: Path) -> None:
    gate = Gate()
    w = watch(tmp_path, model=WedgedModel(gate), gate=gate)
    assert gate.entered.is_set()  # the worker did get the pair, and never came back
    assert_stopped_naming(w, "process")


def test_a_hanging_camera_read_stops_the_pings(tmp_path: Path) -> None:
    w = watch(tmp_path, camera=HangingCamera)
    assert w.stats.captures == 1  # one pair, then the read hung
    assert_stopped_naming(w, "capture")


def test_a_record_writer_that_never_drains_stops_the_pings(tmp_path: Path) -> None:
    gate = Gate()
    w = watch(tmp_path, connect=hung_disk(gate), gate=gate)
    assert gate.entered.is_set()  # the rows reached the disk, which never answered
    assert_stopped_naming(w, "record")


def test_valves_that_never_report_stop_the_pings(tmp_path: Path) -> None:
    w = watch(tmp_path, valves=SilentValves)
    assert_stopped_naming(w, "valves")


def test_a_healthy_run_and_then_an_idle_channel_keep_pinging(tmp_path: Path) -> None:
    w = watch(tmp_path)
    assert w.stats.objects == len(STONES)  # every stone decided; then nothing to do
    assert not w.notifier.statuses()
    # A ping every PERIOD_S: allow for a slow machine, but not for a pause longer than the stall.
    times = [t for t, s in w.notifier.sent if s == "WATCHDOG=1"]
    assert times and max(b - a for a, b in zip([w.started, *times], times + [w.started + RUN_S], strict=True)) < STALL_S


def test_a_sorter_with_no_stones_keeps_pinging(tmp_path: Path) -> None:
    w = watch(tmp_path, trigger=NoTrigger())
    assert w.stats.captures == 0 and not w.notifier.statuses()
    assert w.notifier.pings_after(w.started + RUN_S - 0.5) > 0


# -- the watchdog's rule, alone ------------------------------------------------------


@dataclass
class Probe:
    name: str
    waiting: int = 0
    done: int = 0

    def beat(self) -> Beat:
        return Beat(self.waiting, self.done)


def test_only_work_waiting_without_progress_is_stuck() -> None:
    stage = Probe("s")
    dog = Watchdog([stage], stall_s=5.0)
    assert dog.stuck(0.0) == [] and dog.stuck(100.0) == []  # idle for ever: never stuck
    stage.waiting = 1
    assert dog.stuck(104.9) == []  # waiting, but the clock starts when it was last seen idle
    assert dog.stuck(105.0) == [("s", 5.0)]
    stage.done += 1
    assert dog.stuck(106.0) == []  # it moved: the count starts again
    assert dog.stuck(110.5) == []
    assert dog.stuck(111.0) == [("s", 5.0)]


def test_liveness_counts_begin_and_end() -> None:
    live = Liveness("capture")
    live.begin()
    live.begin()
    live.end()
    assert live.beat() == Beat(1, 1) and live.name == "capture"


@pytest.mark.parametrize("stall_s", [0.0, 601.0])
def test_stall_s_is_bounded(tmp_path: Path, stall_s: float) -> None:
    from conftest import problems_of

    [msg] = problems_of(tmp_path, f"[service]\nstall_s = {stall_s}\n")
    assert msg.startswith(f"service.stall_s = {stall_s}")
