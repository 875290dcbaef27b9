"""`jetson` and `gpiod` valves, against small hand-written fakes of the two libraries.

The fakes implement just the API surface the backend uses (Jetson.GPIO's
RPi.GPIO-style functions; libgpiod v2's request_lines / LineSettings /
LineRequest) and record every call with the time it was made, so the tests
check what was called, in which order, and when.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import sorterd.controller.outputs
from sorterd.clock import WallClock
from sorterd.controller import gpio as G
from sorterd.controller.outputs import Pulse, PulseOutcome
from sorterd.parts.valves.gpio import GpioValvesConfig

Call = tuple[str, tuple[Any, ...], int]


class FakeJetsonGPIO:
    """Jetson.GPIO as far as the backend uses it."""

    BOARD, BCM, CVM, TEGRA_SOC = "BOARD", "BCM", "CVM", "TEGRA_SOC"
    OUT, IN = "OUT", "IN"
    HIGH, LOW = 1, 0

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.level: dict[int, int] = {}
        self.fail_on_high = False

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args, time.monotonic_ns()))

    def setwarnings(self, flag: bool) -> None:
        self._rec("setwarnings", flag)

    def setmode(self, mode: str) -> None:
        self._rec("setmode", mode)

    def setup(self, pin: int, direction: str, initial: int = 0) -> None:
        self._rec("setup", pin, direction, initial)
        self.level[pin] = initial

    def output(self, pin: int, value: int) -> None:
        if self.fail_on_high and value == self.HIGH:
            raise RuntimeError("line write failed")
        self._rec("output", pin, value)
        self.level[pin] = value

    def cleanup(self, pins: list[int] | None = None) -> None:
        self._rec("cleanup", pins)


class Direction(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class Value(enum.Enum):
    INACTIVE = 0
    ACTIVE = 1


@dataclass
class LineSettings:
    direction: Direction = Direction.INPUT
    output_value: Value = Value.INACTIVE
    active_low: bool = False


@dataclass
class FakeRequest:
    owner: FakeGpiod
    offsets: tuple[int, ...]
    released: bool = False

    def set_value(self, offset: int, value: Value) -> None:
        assert not self.released and offset in self.offsets
        self.owner.rec("set_value", offset, value)
        self.owner.value[offset] = value

    def set_values(self, values: dict[int, Value]) -> None:
        assert not self.released
        self.owner.rec("set_values", dict(values))
        self.owner.value.update(values)

    def release(self) -> None:
        self.owner.rec("release")
        self.released = True


@dataclass
class FakeGpiod:
    """libgpiod v2 Python bindings (gpiod.request_lines, gpiod.LineSettings, gpiod.line)."""

    calls: list[Call] = field(default_factory=list)
    value: dict[int, Value] = field(default_factory=dict)
    line: Any = None
    LineSettings: Any = LineSettings

    def __post_init__(self) -> None:
        self.line = type("line", (), {"Direction": Direction, "Value": Value})

    def rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args, time.monotonic_ns()))

    def request_lines(self, path: str, consumer: str | None = None, config: Any = None) -> FakeRequest:
        self.rec("request_lines", path, consumer, config)
        [(offsets, settings)] = config.items()
        for o in offsets:
            self.value[o] = settings.output_value
        return FakeRequest(self, tuple(offsets))


def jetson_lines(**options: Any) -> G.GpioLines:
    """`[valves] type = "gpio", library = "jetson"` on the usual header pins (BOARD numbering)."""
    return GpioValvesConfig(library="jetson", **{"pins": {"CUT": 31, "SELECT": 33, "FLIP": 35}, **options}).lines()


def gpiod_lines(**options: Any) -> G.GpioLines:
    """`[valves] type = "gpio", library = "gpiod"`."""
    return GpioValvesConfig(library="gpiod", **options).lines()


# No SCHED_FIFO in a test process; a generous late limit, as a loaded CI box
# may wake the thread a few ms late (the limit itself is tested on its own).
JETSON = jetson_lines(rt_priority=0, late_limit_us=5000.0)
GPIOD = gpiod_lines(rt_priority=0, late_limit_us=5000.0)


def with_valves(cfg: Any, lib: Any, body: Callable[[G.GpioValves], Awaitable[None]]) -> G.GpioValves:
    async def main() -> G.GpioValves:
        v = G.open_gpio_valves(cfg, WallClock(), lib=lib)
        try:
            await body(v)
        finally:
            v.close()
        return v

    return asyncio.run(main())


def pulse(valve: str, ahead_ms: float, width_ms: float, sid: str = "S1") -> Pulse:
    t = time.monotonic_ns() + int(ahead_ms * 1e6)
    return Pulse(valve, t, t + int(width_ms * 1e6), sid)


def test_jetson_lines_start_off_then_pulse_then_cleanup_in_order() -> None:
    lib = FakeJetsonGPIO()
    outs: list[PulseOutcome] = []

    async def body(v: G.GpioValves) -> None:
        p = pulse("SELECT", 10, 5)
        assert v.schedule(p) is None
        outs.append(await v.outcome(p))

    with_valves(JETSON, lib, body)
    names = [(n, a) for n, a, _ in lib.calls]
    assert names[:5] == [("setwarnings", (False,)), ("setmode", ("BOARD",)), ("setup", (31, "OUT", 0)),
                         ("setup", (33, "OUT", 0)), ("setup", (35, "OUT", 0))]
    assert names[5:7] == [("output", (33, 1)), ("output", (33, 0))]
    assert names[-1] == ("cleanup", ([31, 33, 35],))
    assert set(names[7:-1]) == {("output", (31, 0)), ("output", (33, 0)), ("output", (35, 0))}  # all off
    [o] = outs
    on_call, off_call = lib.calls[5][2], lib.calls[6][2]
    assert o.status == "fired" and o.actual_on_ns is not None and o.actual_off_ns is not None
    # Stamped right after the line write: the actual edge, not the plan.
    assert on_call <= o.actual_on_ns < on_call + 1_000_000 and off_call <= o.actual_off_ns
    assert 0 <= o.actual_on_ns - o.pulse.start_ns < 5_000_000


def test_jetson_active_low_inverts_every_level() -> None:
    lib = FakeJetsonGPIO()

    async def body(v: G.GpioValves) -> None:
        p = pulse("CUT", 60, 3)  # far enough ahead that a loaded host still fires it (not refused late)
        v.schedule(p)
        await v.outcome(p)

    cfg = jetson_lines(rt_priority=0, late_limit_us=5000.0, active_low=True, numbering="BCM",
                             pins={"CUT": 5, "SELECT": 6, "FLIP": 13})
    with_valves(cfg, lib, body)
    assert ("setmode", ("BCM",)) in [(n, a) for n, a, _ in lib.calls]
    assert [a for n, a, _ in lib.calls if n == "setup"] == [(5, "OUT", 1), (6, "OUT", 1), (13, "OUT", 1)]
    outputs = [a for n, a, _ in lib.calls if n == "output"]
    assert outputs[:2] == [(5, 0), (5, 1)] and lib.level == {5: 1, 6: 1, 13: 1}


def test_gpiod_one_request_pulses_and_release_last() -> None:
    lib = FakeGpiod()

    async def body(v: G.GpioValves) -> None:
        ps = [pulse("CUT", 10, 3, "S1"), pulse("FLIP", 16, 3, "S2")]
        for p in ps:
            assert v.schedule(p) is None
        for p in ps:
            assert (await v.outcome(p)).status == "fired"

    with_valves(GPIOD, lib, body)
    name, args, _ = lib.calls[0]
    assert name == "request_lines" and args[0] == "/dev/gpiochip0" and args[1] == "sorterd-valves"
    [(offsets, settings)] = args[2].items()
    assert offsets == (17, 27, 22)
    assert settings == LineSettings(Direction.OUTPUT, Value.INACTIVE, False)
    sets = [a for n, a, _ in lib.calls if n == "set_value"]
    assert sets == [(17, Value.ACTIVE), (17, Value.INACTIVE), (22, Value.ACTIVE), (22, Value.INACTIVE)]
    assert [n for n, _, _ in lib.calls[-2:]] == ["set_values", "release"]
    assert lib.calls[-2][1][0] == {17: Value.INACTIVE, 27: Value.INACTIVE, 22: Value.INACTIVE}


def test_the_edge_observer_hears_each_fired_pulse_at_its_actual_edges() -> None:
    lib = FakeGpiod()
    heard: list[tuple[str, int, int]] = []

    async def main() -> list[PulseOutcome]:
        v = G.open_gpio_valves(GPIOD, WallClock(), lambda valve, on, off: heard.append((valve, on, off)), lib=lib)
        try:
            ps = [pulse("CUT", 10, 3, "S1"), pulse("FLIP", 16, 3, "S2"), pulse("SELECT", 30, 3, "S3")]
            for p in ps:
                v.schedule(p)
            v.cancel(ps[2])  # never fired: nothing to hear
            return [await v.outcome(p) for p in ps]
        finally:
            v.close()

    outs = asyncio.run(main())
    assert [o.status for o in outs] == ["fired", "fired", "cancelled"]
    assert heard == [(o.pulse.valve, o.actual_on_ns, o.actual_off_ns) for o in outs[:2]]


def test_refusals_late_too_long_overlap_and_cancel() -> None:
    lib = FakeGpiod()
    got: dict[str, Any] = {}

    async def body(v: G.GpioValves) -> None:
        got["late"] = v.schedule(pulse("CUT", 0.5, 3))
        got["long"] = v.schedule(pulse("CUT", 20, 45))
        a = pulse("SELECT", 30, 5, "A")
        got["a"] = v.schedule(a)
        got["overlap"] = v.schedule(pulse("SELECT", 32, 5, "B"))
        got["cancel"] = v.cancel(a)
        got["outcome"] = (await v.outcome(a)).status

    v = with_valves(GPIOD, lib, body)
    assert got["late"].startswith("refused: late (start 0.")
    assert got["long"] == "refused: bad duration (45.00 ms, max on 40.0 ms)"
    assert got["a"] is None and got["overlap"] == "refused: overlap"
    assert got["cancel"] is True and got["outcome"] == "cancelled"
    assert [n for n, _, _ in lib.calls if n == "set_value"] == []  # nothing ever moved
    assert v.stats().refusals == {"late": 1, "bad duration": 1, "overlap": 1}  # bounded kinds: metric labels


def test_an_edge_the_thread_reaches_too_late_is_refused_not_fired() -> None:
    lib = FakeGpiod()
    real_set = FakeRequest.set_value
    outs: list[str] = []

    def slow_set(self: FakeRequest, offset: int, value: Value) -> None:
        real_set(self, offset, value)
        if offset == 17 and value == Value.ACTIVE:
            time.sleep(0.010)  # the write blocks: the next edge's thread is ~9 ms late

    async def body(v: G.GpioValves) -> None:
        FakeRequest.set_value = slow_set  # type: ignore[method-assign]
        a, b = pulse("CUT", 10, 8, "A"), pulse("FLIP", 11, 3, "B")
        v.schedule(a)
        v.schedule(b)
        outs.extend([(await v.outcome(a)).status, (await v.outcome(b)).status])

    try:
        # A limit well above this VM's ordinary wake-up lateness (up to ~2 ms seen), well below 9 ms.
        v = with_valves(gpiod_lines(rt_priority=0, late_limit_us=3000.0), lib, body)
    finally:
        FakeRequest.set_value = real_set  # type: ignore[method-assign]
    assert outs[0] == "fired" and outs[1].startswith("refused: late at fire")
    assert v.stats().late_at_fire == 1  # the summary's figure (was always 0 for gpio)
    assert 22 not in [a[0] for n, a, _ in lib.calls if n == "set_value"]


def test_outputs_forced_off_when_the_thread_fails() -> None:
    lib = FakeJetsonGPIO()
    got: dict[str, Any] = {}

    async def body(v: G.GpioValves) -> None:
        lib.fail_on_high = True
        v.schedule(pulse("FLIP", 30, 3))  # ahead enough not to be refused late on a loaded host
        for _ in range(200):  # until the thread has tried the write and failed
            await asyncio.sleep(0.01)
            if v.stats().state == "failed":
                break
        got["after"] = v.schedule(pulse("FLIP", 20, 3, "S2"))
        got["state"] = v.stats().state

    with_valves(JETSON, lib, body)
    assert got["after"].startswith("refused: valve thread failed (RuntimeError: line write failed)")
    assert got["state"] == "failed"
    assert lib.level == {31: 0, 33: 0, 35: 0}
    assert [n for n, _, _ in lib.calls][-1] == "cleanup"


def test_interpreter_exit_switches_open_backends_off() -> None:
    lib = FakeGpiod()

    async def main() -> None:
        cfg = gpiod_lines(rt_priority=0, late_limit_us=5000.0, max_on_ms=1000.0)
        v = G.open_gpio_valves(cfg, WallClock(), lib=lib)
        v.schedule(pulse("CUT", 5, 900))
        for _ in range(160):  # open by now, even on a loaded host (the pulse lasts 0.9 s)
            await asyncio.sleep(0.005)
            if lib.value[17] == Value.ACTIVE:
                break
        assert lib.value[17] == Value.ACTIVE
        sorterd.controller.outputs._close_all_at_exit()  # what atexit runs when close() was never called

    asyncio.run(main())
    assert lib.value == {17: Value.INACTIVE, 27: Value.INACTIVE, 22: Value.INACTIVE}
    assert lib.calls[-1][0] == "release"


def test_switch_interval_is_restored() -> None:
    before = sys.getswitchinterval()

    async def body(v: G.GpioValves) -> None:
        assert sys.getswitchinterval() == pytest.approx(200e-6, rel=0.01)

    with_valves(GPIOD, FakeGpiod(), body)
    assert sys.getswitchinterval() == before


def test_missing_library_is_a_clear_error_only_when_chosen() -> None:
    async def main() -> None:
        G.open_gpio_valves(JETSON, WallClock())

    with pytest.raises(G.GpioError, match=r"needs the Jetson.GPIO library: pip install 'sorterd\[jetson\]'"):
        asyncio.run(main())


def test_realtime_setup_reports_what_it_could_not_get() -> None:
    class Libc:
        def mlockall(self, flags: int) -> int:
            return -1

        def prctl(self, *args: int) -> int:
            return 0

    def no_fifo(*args: Any) -> None:
        raise PermissionError("Operation not permitted")

    rep = G.make_realtime(50, libc=Libc(), setscheduler=no_fifo)
    assert not rep.fifo and not rep.mlock and rep.timerslack
    assert any("SCHED_FIFO not permitted" in n for n in rep.notes)
    assert any("mlockall not permitted" in n for n in rep.notes)
    assert G.make_realtime(0).notes == ["rt_priority = 0: normal scheduling"]
