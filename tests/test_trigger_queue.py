"""The trigger queue: bounded, its end marker always gets in, covered edges are dropped."""

from __future__ import annotations

import asyncio

from sorterd.parts.trigger import TriggerEvent
from sorterd.sorting.trigger_queue import TriggerQueue


def drain(q: TriggerQueue) -> list[TriggerEvent | None]:
    """Everything the queue hands out, up to and including its end marker."""
    async def take() -> list[TriggerEvent | None]:
        got: list[TriggerEvent | None] = []
        while True:
            ev = await asyncio.wait_for(q.get(), 1.0)
            got.append(ev)
            if ev is None:
                return got
    return asyncio.run(take())


def test_it_is_bounded_and_refuses_what_does_not_fit() -> None:
    q = TriggerQueue(maxsize=2)
    assert [q.put_nowait(TriggerEvent(t)) for t in (10, 20, 30)] == [True, True, False]
    assert q.put_nowait(None)  # the end marker is never refused, even when full
    assert drain(q) == [TriggerEvent(10), TriggerEvent(20), None]  # first in, first out; 30 was dropped


def test_a_waiting_capture_wakes_for_the_next_edge() -> None:
    async def scenario() -> list[TriggerEvent | None]:
        q = TriggerQueue(maxsize=4)
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        assert not waiter.done()  # nothing queued: it waits, it does not return None
        q.put_nowait(TriggerEvent(5))
        first = await asyncio.wait_for(waiter, 1.0)
        q.put_nowait(None)
        return [first, await asyncio.wait_for(q.get(), 1.0)]

    assert asyncio.run(scenario()) == [TriggerEvent(5), None]


def test_drop_covered_drops_the_edges_up_to_the_exposure_only() -> None:
    q = TriggerQueue(maxsize=8)
    for t in (100, 200, 300, 400):
        q.put_nowait(TriggerEvent(t))
    assert q.drop_covered(99) == []
    assert q.drop_covered(300) == [TriggerEvent(100), TriggerEvent(200), TriggerEvent(300)]  # <= t0: in the pair
    q.put_nowait(None)
    assert drain(q) == [TriggerEvent(400), None]


def test_drop_covered_never_drops_the_end_marker() -> None:
    q = TriggerQueue(maxsize=8)
    q.put_nowait(TriggerEvent(100))
    q.put_nowait(None)
    q.put_nowait(TriggerEvent(150))  # after the end: never reached
    assert q.drop_covered(10**12) == [TriggerEvent(100)]
    assert drain(q) == [None]


def test_dropping_makes_room_again() -> None:
    q = TriggerQueue(maxsize=2)
    q.put_nowait(TriggerEvent(1))
    q.put_nowait(TriggerEvent(2))
    assert not q.put_nowait(TriggerEvent(3))
    q.drop_covered(1)
    assert q.put_nowait(TriggerEvent(4))
    q.put_nowait(None)
    assert drain(q) == [TriggerEvent(2), TriggerEvent(4), None]
