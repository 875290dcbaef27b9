"""The virtual clock skips idle time but never while a worker is computing."""

from __future__ import annotations

import asyncio
import time

from sorterd.clock import VirtualClock, WallClock


def test_virtual_clock_skips_sleep() -> None:
    clock = VirtualClock()
    loop = clock.new_event_loop()

    async def main() -> tuple[int, float]:
        t0, w0 = clock.now_ns(), time.monotonic()
        await clock.sleep_until(t0 + 30 * 1_000_000_000)
        return clock.now_ns() - t0, time.monotonic() - w0

    try:
        virtual_ns, wall_s = loop.run_until_complete(main())
    finally:
        loop.close()
    assert virtual_ns >= 30 * 1_000_000_000
    assert wall_s < 2.0


def test_virtual_clock_does_not_skip_while_executor_busy() -> None:
    clock = VirtualClock()
    loop = clock.new_event_loop()

    async def main() -> int:
        t0 = clock.now_ns()
        sleeper = asyncio.ensure_future(clock.sleep_until(t0 + 10 * 1_000_000_000))
        await loop.run_in_executor(None, time.sleep, 0.2)
        # While the worker slept 0.2 s of real time, the loop must not have
        # jumped 10 s ahead.
        elapsed = clock.now_ns() - t0
        sleeper.cancel()
        return elapsed

    try:
        elapsed = loop.run_until_complete(main())
    finally:
        loop.close()
    assert 0.19e9 <= elapsed < 2e9


def test_sleep_until_orders_events() -> None:
    clock = VirtualClock()
    loop = clock.new_event_loop()
    order: list[int] = []

    async def at(ms: int) -> None:
        await clock.sleep_until(base + ms * 1_000_000)
        order.append(ms)
        assert clock.now_ns() >= base + ms * 1_000_000

    base = clock.now_ns()

    async def main() -> None:
        await asyncio.gather(at(300), at(100), at(200))

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert order == [100, 200, 300]


def test_wall_clock_is_monotonic_ns() -> None:
    c = WallClock()
    a = c.now_ns()
    b = time.monotonic_ns()
    assert 0 <= b - a < 1e8
