"""The trigger queue: edges waiting for a capture (event-loop thread only)."""

from __future__ import annotations

import asyncio
from collections import deque

from sorterd.parts.trigger import TriggerEvent


class TriggerQueue:
    """Bounded FIFO of trigger edges (loop thread only).

    Unlike asyncio.Queue it can drop the edges a capture already covered:
    a stone whose edge came before the exposure is in that frame pair.
    """

    def __init__(self, maxsize: int) -> None:
        self._edges: deque[TriggerEvent | None] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()

    def put_nowait(self, ev: TriggerEvent | None) -> bool:
        """False when full (an end marker, None, is always accepted)."""
        if ev is not None and len(self._edges) >= self._maxsize:
            return False
        self._edges.append(ev)
        self._ready.set()
        return True

    async def get(self) -> TriggerEvent | None:
        while not self._edges:
            self._ready.clear()
            await self._ready.wait()
        return self._edges.popleft()

    def drop_covered(self, t0_ns: int) -> list[TriggerEvent]:
        """Drop the edges from before t0_ns and return them."""
        dropped: list[TriggerEvent] = []
        while self._edges and (ev := self._edges[0]) is not None and ev.t_ns <= t0_ns:
            self._edges.popleft()
            dropped.append(ev)
        return dropped
