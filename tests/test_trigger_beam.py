"""`beam` trigger, against small hand-written fakes of libgpiod v2 and Jetson.GPIO.

The gpiod fake mirrors the real bindings' names (gpiod.request_lines,
gpiod.LineSettings with the real field names, gpiod.line.{Direction, Edge,
Bias, Clock}, gpiod.EdgeEvent.Type, LineRequest.wait_edge_events /
read_edge_events / release); its requests hand out scripted edge events with
kernel timestamps, or raise scripted errors.  The Jetson.GPIO fake calls the
registered callback from its own thread, as the library does; the host time
of each callback comes from a scripted clock.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from sorterd.clock import VirtualClock, WallClock
from sorterd.controller.gpio import GpioError
from sorterd.parts.trigger import TriggerEvent
from sorterd.parts.trigger.beam import BeamTrigger, BeamTriggerConfig

T = 5_000_000_000_000  # some kernel CLOCK_MONOTONIC instant (ns)
MS = 1_000_000
US = 1_000

# -- fake libgpiod v2 ---------------------------------------------------------------------


class Direction(enum.Enum):
    AS_IS = 1
    INPUT = 2
    OUTPUT = 3


class Edge(enum.Enum):
    NONE = 1
    RISING = 2
    FALLING = 3
    BOTH = 4


class Bias(enum.Enum):
    AS_IS = 1
    UNKNOWN = 2
    DISABLED = 3
    PULL_UP = 4
    PULL_DOWN = 5


class EventClock(enum.Enum):
    MONOTONIC = 1
    REALTIME = 2
    HTE = 3


@dataclass
class LineSettings:  # the real field names and defaults (gpiod 2.1/2.2 line_settings.py)
    direction: Direction = Direction.AS_IS
    edge_detection: Edge = Edge.NONE
    bias: Bias = Bias.AS_IS
    drive: Any = None
    active_low: bool = False
    debounce_period: timedelta = timedelta()
    event_clock: EventClock = EventClock.MONOTONIC
    output_value: Any = None


@dataclass(frozen=True)
class EdgeEvent:
    class Type(enum.Enum):
        RISING_EDGE = 1
        FALLING_EDGE = 2

    event_type: Type
    timestamp_ns: int
    line_offset: int
    global_seqno: int
    line_seqno: int


class RequestReleasedError(Exception):
    pass


class FakeRequest:
    def __init__(self, owner: FakeGpiod, offset: int) -> None:
        self.owner = owner
        self.offset = offset
        self.items: deque[list[EdgeEvent] | BaseException] = deque()
        self.cond = threading.Condition()
        self.released = False
        self.seqno = 0
        self.threads: set[threading.Thread] = set()

    def push_edges(self, *edges: tuple[str, int], skip: int = 0) -> None:
        """One batch of edges ('F' or 'R', kernel ns); skip: seqnos the kernel lost before it."""
        batch = []
        self.seqno += skip
        for kind, t_ns in edges:
            self.seqno += 1
            typ = EdgeEvent.Type.FALLING_EDGE if kind == "F" else EdgeEvent.Type.RISING_EDGE
            batch.append(EdgeEvent(typ, t_ns, self.offset, self.seqno, self.seqno))
        self._push(batch)

    def push_error(self, exc: BaseException) -> None:
        self._push(exc)

    def _push(self, item: list[EdgeEvent] | BaseException) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait_edge_events(self, timeout: float | timedelta | None = None) -> bool:
        self.threads.add(threading.current_thread())
        assert isinstance(timeout, float) and 0 < timeout <= 0.5, timeout  # never blocks forever
        with self.cond:
            if self.released:
                raise RequestReleasedError("released")
            if not self.items:
                self.cond.wait(timeout)
            return bool(self.items)

    def read_edge_events(self, max_events: int | None = None) -> list[EdgeEvent]:
        with self.cond:
            item = self.items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self) -> None:
        self.owner.rec("release", self.offset)
        with self.cond:
            self.released = True


@dataclass
class FakeGpiod:
    """gpiod (libgpiod v2 bindings) as far as the backend uses it."""

    failures: list[BaseException | None] = field(default_factory=list)  # per request_lines call, in order
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    requests: list[FakeRequest] = field(default_factory=list)
    line: Any = None
    LineSettings: Any = LineSettings
    EdgeEvent: Any = EdgeEvent

    def __post_init__(self) -> None:
        self.line = SimpleNamespace(Direction=Direction, Edge=Edge, Bias=Bias, Clock=EventClock)

    def rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def request_lines(self, path: str, consumer: str | None = None, config: Any = None) -> FakeRequest:
        self.rec("request_lines", path, consumer, config)
        if self.failures and (exc := self.failures.pop(0)) is not None:
            raise exc
        [(offset, _settings)] = config.items()
        req = FakeRequest(self, offset)
        self.requests.append(req)
        return req


# -- fake Jetson.GPIO ---------------------------------------------------------------------


class FakeJetsonGPIO:
    BOARD, BCM, CVM, TEGRA_SOC = "BOARD", "BCM", "CVM", "TEGRA_SOC"
    IN, OUT = "IN", "OUT"
    RISING, FALLING, BOTH = "RISING", "FALLING", "BOTH"

    def __init__(self, bad_pin: int | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.bad_pin = bad_pin

    def _rec(self, name: str, *args: Any, **kw: Any) -> None:
        self.calls.append((name, args, kw))

    def setwarnings(self, flag: bool) -> None:
        self._rec("setwarnings", flag)

    def setmode(self, mode: str) -> None:
        self._rec("setmode", mode)

    def setup(self, pin: int, direction: str, **kw: Any) -> None:
        if pin == self.bad_pin:
            raise ValueError(f"Channel {pin} is invalid")
        self._rec("setup", pin, direction, **kw)

    def add_event_detect(self, pin: int, edge: str, callback: Any = None, bouncetime: Any = None,
                         polltime: float = 0.2) -> None:
        self._rec("add_event_detect", pin, edge, bouncetime=bouncetime)
        self.callbacks[pin] = callback

    def remove_event_detect(self, pin: int, timeout: float = 0.5) -> None:
        self._rec("remove_event_detect", pin)
        self.callbacks.pop(pin, None)

    def cleanup(self, channel: Any = None) -> None:
        self._rec("cleanup", channel)

    def fire(self, pin: int, n: int) -> threading.Thread:
        """n edges, called back from the library's event thread."""
        def run() -> None:
            for _ in range(n):
                self.callbacks[pin](pin)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th


class ScriptedClock(WallClock):
    """now_ns() hands out the scripted instants, then the real time."""

    def __init__(self, *times: int) -> None:
        self.times = deque(times)

    def now_ns(self) -> int:
        return self.times.popleft() if self.times else time.monotonic_ns()


# -- helpers ------------------------------------------------------------------------------

GPIOD = BeamTriggerConfig()  # library gpiod, /dev/gpiochip0, pin 25, broken low, pull_up, 200 us, 5 ms
JETSON = BeamTriggerConfig(library="jetson", pin=18)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 5.0))


async def until(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.002)


async def take(trig: BeamTrigger, n: int) -> list[int]:
    return [ev.t_ns for ev in [await asyncio.wait_for(trig.next(), 1.0) for _ in range(n)] if ev is not None]


def settings_of(lib: FakeGpiod) -> tuple[str, str, int, LineSettings]:
    name, (path, consumer, config) = lib.calls[0]
    assert name == "request_lines"
    [(offset, settings)] = config.items()
    return path, consumer, offset, settings


# -- gpiod ----------------------------------------------------------------------------------


def test_gpiod_kernel_timestamps_pass_through_with_latency_subtracted() -> None:
    lib = FakeGpiod()
    cfg = replace(GPIOD, latency_ms=1.5)

    async def body() -> tuple[list[int], dict[str, int], set[threading.Thread]]:
        trig = BeamTrigger(cfg, WallClock(), lib=lib)
        try:
            lib.requests[0].push_edges(("F", T), ("R", T + 2 * MS))
            lib.requests[0].push_edges(("F", T + 20 * MS), ("R", T + 23 * MS))
            got = await take(trig, 2)
            await until(lambda: trig.stats()["edges"] == 4)  # the reader has seen every edge
            return got, trig.stats(), lib.requests[0].threads
        finally:
            trig.close()

    got, stats, threads = run(body)
    assert got == [T - 1_500_000, T + 20 * MS - 1_500_000]  # the kernel's edge time, not Python's
    assert stats == {"edges": 4, "triggers": 2, "suppressed": 0, "bounced": 0, "dropped": 0, "reopens": 0}
    [th] = threads  # one dedicated daemon thread, never the loop's
    assert th is not threading.main_thread() and th.daemon and th.name == "sorterd-trigger-beam"


def test_gpiod_line_settings_input_both_edges_bias_monotonic_clock_no_kernel_debounce() -> None:
    lib = FakeGpiod()
    cfg = replace(GPIOD, chip="/dev/gpiochip4", pin=7, bias="pull_down")

    async def body() -> None:
        BeamTrigger(cfg, WallClock(), lib=lib).close()

    run(body)
    path, consumer, offset, s = settings_of(lib)
    assert (path, consumer, offset) == ("/dev/gpiochip4", "sorterd-trigger", 7)
    assert s == LineSettings(direction=Direction.INPUT, edge_detection=Edge.BOTH, bias=Bias.PULL_DOWN,
                             debounce_period=timedelta(0), event_clock=EventClock.MONOTONIC)
    assert lib.calls[-1] == ("release", (7,))
    for bias, want in (("pull_up", Bias.PULL_UP), ("as_is", Bias.AS_IS), ("disabled", Bias.DISABLED)):
        other = FakeGpiod()
        run(lambda b=bias, g=other: _open_close(replace(GPIOD, bias=b), g))  # type: ignore[misc]
        assert settings_of(other)[3].bias == want


async def _open_close(cfg: BeamTriggerConfig, lib: Any) -> None:
    BeamTrigger(cfg, WallClock(), lib=lib).close()


def test_gpiod_kernel_debounce_when_asked_sets_the_period_and_skips_the_software_one() -> None:
    lib = FakeGpiod()
    cfg = replace(GPIOD, debounce_us=300.0, holdoff_ms=0.0)

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(cfg, WallClock(), lib=lib, kernel_debounce=True)
        try:
            lib.requests[0].push_edges(("F", T), ("R", T + 20 * US), ("F", T + 40 * US))
            return await take(trig, 2), trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert settings_of(lib)[3].debounce_period == timedelta(microseconds=300)
    assert got == [T, T + 40 * US] and stats["bounced"] == 0  # the kernel's edges are trusted as they are


def test_broken_level_chooses_the_edge() -> None:
    async def body(level: str) -> list[int]:
        lib = FakeGpiod()
        trig = BeamTrigger(replace(GPIOD, broken_level=level, holdoff_ms=0.0), WallClock(), lib=lib)
        try:
            lib.requests[0].push_edges(("F", T), ("R", T + 3 * MS), ("F", T + 10 * MS), ("R", T + 12 * MS))
            got = await take(trig, 2)
            await until(lambda: trig.stats()["edges"] == 4)  # the reader has seen every edge
            assert trig.stats()["triggers"] == 2  # and no third
            return got
        finally:
            trig.close()

    assert run(lambda: body("low")) == [T, T + 10 * MS]  # falling edges: low while broken
    assert run(lambda: body("high")) == [T + 3 * MS, T + 12 * MS]  # rising edges: high while broken


def test_holdoff_suppresses_the_same_stone_flickering() -> None:
    lib = FakeGpiod()

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(replace(GPIOD, holdoff_ms=5.0), WallClock(), lib=lib)
        try:
            lib.requests[0].push_edges(("F", T), ("R", T + 1 * MS), ("F", T + 2 * MS), ("R", T + 3 * MS),
                                       ("F", T + int(4.9 * MS)), ("R", T + int(5.5 * MS)),
                                       ("F", T + 6 * MS), ("R", T + 8 * MS))
            got = await take(trig, 2)
            await until(lambda: trig.stats()["edges"] == 8)  # the reader has seen every edge
            return got, trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert got == [T, T + 6 * MS]  # 6 ms after the last trigger: a new stone
    assert stats == {"edges": 8, "triggers": 2, "suppressed": 2, "bounced": 0, "dropped": 0, "reopens": 0}


def test_gpiod_software_debounce_on_kernel_timestamps_catches_the_release_bounce() -> None:
    lib = FakeGpiod()

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(replace(GPIOD, debounce_us=200.0, holdoff_ms=5.0), WallClock(), lib=lib)
        try:
            lib.requests[0].push_edges(
                ("F", T), ("R", T + 20 * US), ("F", T + 40 * US),  # bounce on breaking
                ("R", T + 10 * MS), ("F", T + 10 * MS + 30 * US), ("R", T + 10 * MS + 60 * US),  # on clearing:
                # past the holdoff, so without debounce the F at +10.03 ms would be a second stone
                ("F", T + 30 * MS), ("R", T + 32 * MS))
            got = await take(trig, 2)
            await until(lambda: trig.stats()["edges"] == 8)  # the reader has seen every edge
            return got, trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert got == [T, T + 30 * MS]
    assert stats["bounced"] == 4 and stats["triggers"] == 2 and stats["suppressed"] == 0


def test_queue_overflow_and_kernel_losses_are_counted_as_dropped() -> None:
    lib = FakeGpiod()

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(GPIOD, WallClock(), lib=lib, queue_size=2)
        try:
            for i in range(5):  # nobody reads next() meanwhile
                lib.requests[0].push_edges(("F", T + i * 10 * MS), ("R", T + i * 10 * MS + MS))
            await until(lambda: trig.stats()["dropped"] == 3)
            got = await take(trig, 2)  # the oldest two were kept
            lib.requests[0].push_edges(("F", T + 100 * MS), skip=2)  # the kernel buffer lost 2 edges before this
            got += await take(trig, 1)
            return got, trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert got == [T, T + 10 * MS, T + 100 * MS]
    assert stats["triggers"] == 6 and stats["dropped"] == 5


def test_close_ends_a_pending_next_with_none_promptly_and_releases_the_line() -> None:
    lib = FakeGpiod()

    async def body() -> tuple[TriggerEvent | None, TriggerEvent | None, float, bool]:
        trig = BeamTrigger(GPIOD, WallClock(), lib=lib)
        pending = asyncio.ensure_future(trig.next())
        await asyncio.sleep(0.05)
        assert not pending.done()
        t0 = time.monotonic()
        trig.close()
        took = time.monotonic() - t0
        first = await asyncio.wait_for(pending, 0.5)
        assert trig._thread is not None
        return first, await trig.next(), took, trig._thread.is_alive()

    first, again, took, alive = run(body)
    assert first is None and again is None
    assert took < 0.5 and not alive
    assert lib.requests[0].released and lib.calls[-1] == ("release", (25,))


def test_a_line_that_cannot_be_requested_is_a_gpio_error_naming_chip_and_pin() -> None:
    lib = FakeGpiod(failures=[OSError(errno.EBUSY, "Device or resource busy")])

    async def body() -> None:
        BeamTrigger(GPIOD, WallClock(), lib=lib)

    with pytest.raises(GpioError) as exc:
        run(body)
    msg = str(exc.value)
    assert isinstance(exc.value, OSError)
    assert msg.startswith("trigger.chip = '/dev/gpiochip0', trigger.pin = 25: cannot request the sensor line")
    assert "Device or resource busy" in msg and "another process" in msg
    assert lib.requests == []

    lib = FakeGpiod(failures=[FileNotFoundError(errno.ENOENT, "No such file or directory")])
    with pytest.raises(GpioError, match=r"trigger.chip = '/dev/gpiochip9'.*no such GPIO chip.*gpiodetect"):
        run(lambda: _open_close(replace(GPIOD, chip="/dev/gpiochip9"), lib))


def test_missing_library_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiod", None)  # import gpiod -> ImportError
    monkeypatch.setitem(sys.modules, "Jetson.GPIO", None)
    with pytest.raises(GpioError, match=r"trigger.pin = 25: trigger.library = 'gpiod' needs the gpiod library: "
                                        r"pip install 'sorterd\[gpiod\]'"):
        run(lambda: _open_close(GPIOD, None))
    with pytest.raises(GpioError, match=r"needs the Jetson.GPIO library: pip install 'sorterd\[jetson\]'"):
        run(lambda: _open_close(JETSON, None))


def test_virtual_clock_is_refused() -> None:
    with pytest.raises(GpioError, match="needs the wall clock"):
        BeamTrigger(GPIOD, VirtualClock(), lib=FakeGpiod())


def test_reader_error_then_re_request_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BeamTrigger, "RETRY_MIN_S", 0.01)
    # first request fine; after the error, one failed re-request (chip still gone), then fine
    lib = FakeGpiod(failures=[None, OSError(errno.ENODEV, "No such device")])

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(GPIOD, WallClock(), lib=lib)
        try:
            lib.requests[0].push_edges(("F", T), ("R", T + MS))
            got = await take(trig, 1)
            lib.requests[0].push_error(OSError(errno.ENODEV, "No such device"))
            await until(lambda: len(lib.requests) == 2)
            lib.requests[1].push_edges(("F", T + 1000 * MS))
            got += await take(trig, 1)
            return got, trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert got == [T, T + 1000 * MS]
    assert stats["reopens"] == 1 and stats["triggers"] == 2
    assert [n for n, _ in lib.calls].count("request_lines") == 3
    assert lib.requests[0].released and lib.requests[1].released


def test_parts_opens_the_beam_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from sorterd.cli import compose
    from sorterd.parts.registry import Opening

    lib = FakeGpiod()
    monkeypatch.setitem(sys.modules, "gpiod", lib)  # what `import gpiod` finds

    async def body() -> Any:
        opening = Opening(cfg=SimpleNamespace(trigger=GPIOD), clock=WallClock())  # type: ignore[arg-type]
        trig = compose._open("trigger", GPIOD, opening)
        trig.close()
        return trig

    assert isinstance(run(body), BeamTrigger)
    assert settings_of(lib)[:3] == ("/dev/gpiochip0", "sorterd-trigger", 25)


# -- Jetson.GPIO --------------------------------------------------------------------------


def test_jetson_stamps_on_callback_debounces_and_holds_off_in_software() -> None:
    lib = FakeJetsonGPIO()
    clock = ScriptedClock(T, T + 50 * US, T + 100 * US, T + 3 * MS, T + 10 * MS)
    cfg = replace(JETSON, debounce_us=200.0, holdoff_ms=5.0, latency_ms=0.5)

    async def body() -> tuple[list[int], dict[str, int]]:
        trig = BeamTrigger(cfg, clock, lib=lib)
        try:
            lib.fire(18, 5)
            got = await take(trig, 2)
            await until(lambda: trig.stats()["edges"] == 5)  # the reader has seen every edge
            return got, trig.stats()
        finally:
            trig.close()

    got, stats = run(body)
    assert got == [T - 500 * US, T + 10 * MS - 500 * US]
    assert stats == {"edges": 5, "triggers": 2, "suppressed": 1, "bounced": 2, "dropped": 0, "reopens": 0}
    names = [(n, a, kw) for n, a, kw in lib.calls]
    assert names[:4] == [("setwarnings", (False,), {}), ("setmode", ("BOARD",), {}), ("setup", (18, "IN"), {}),
                         ("add_event_detect", (18, "FALLING"), {"bouncetime": None})]  # 200 us < 1 ms
    assert names[-2:] == [("remove_event_detect", (18,), {}), ("cleanup", (18,), {})]


def test_jetson_rising_edge_and_whole_ms_bouncetime() -> None:
    lib = FakeJetsonGPIO()
    run(lambda: _open_close(replace(JETSON, broken_level="high", debounce_us=2500.0, numbering="BCM"), lib))
    assert ("setmode", ("BCM",), {}) in lib.calls
    assert ("add_event_detect", (18, "RISING"), {"bouncetime": 2}) in lib.calls


def test_jetson_close_ends_a_pending_next() -> None:
    lib = FakeJetsonGPIO()

    async def body() -> TriggerEvent | None:
        trig = BeamTrigger(JETSON, WallClock(), lib=lib)
        pending = asyncio.ensure_future(trig.next())
        await asyncio.sleep(0.01)
        trig.close()
        return await asyncio.wait_for(pending, 0.5)

    assert run(body) is None
    assert [n for n, _, _ in lib.calls][-2:] == ["remove_event_detect", "cleanup"]


def test_jetson_bad_pin_is_a_gpio_error_naming_the_pin() -> None:
    lib = FakeJetsonGPIO(bad_pin=99)
    with pytest.raises(GpioError, match=r"trigger.numbering = 'BOARD', trigger.pin = 99: Jetson.GPIO cannot watch "
                                        r"the sensor pin: Channel 99 is invalid"):
        run(lambda: _open_close(replace(JETSON, pin=99), lib))
    assert lib.calls[-1] == ("cleanup", (99,), {})
