"""A small sorter for the link's kill tests (tests/test_link_e2e.py): it owns an Outbox and a
LinkClient as `sorterd run` does, but no camera or model, so a SIGKILL can land every second.

    python tests/link_kill_child.py OUTBOX_DIR SORTER_SECRET TRAINER_PUBLIC ENDPOINT SORTER_ID RUN N

It queues a session record then N stones of batch RUN (durable before anything is sent: the
outbox's future), and meanwhile sends what the outbox holds (this run's and any earlier run's).
On stdout, flushed line by line: "D <sorter>|<batch>|<stone>" once a record is durable, and
"A ..." when the trainer's ACK for it arrives (before the outbox removes it: the test may kill
us in between, and then the record is resent -- it must be stored once all the same).  With
N = 0 it only drains; it prints "EMPTY" and exits when the outbox is empty.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import numpy as np

from sorterd.link.client import ClientOptions, LinkClient
from sorterd.link.keys import load_public, load_secret
from sorterd.link.outbox import Outbox
from sorterd.link.records import Record, RecordKey, SessionRecord, StoneRecord

_SAY = threading.Lock()


def say(line: str) -> None:
    """One whole line per write, under a lock: acks are said from the client's worker threads while
    the queue says D lines on the loop, and print() writes the text and its newline separately
    (two threads' lines interleaved into 'S000013A ...', read as a stone that never existed)."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class SaysAcks:
    """The outbox, saying each ACK on stdout before it is applied."""

    def __init__(self, box: Outbox) -> None:
        self.box = box

    def pending(self, limit: int, exclude: frozenset[RecordKey]) -> list[Record]:
        return self.box.pending(limit, exclude)

    def acknowledged(self, key: RecordKey) -> None:
        say("A " + "|".join(key))
        self.box.acknowledged(key)

    def refused(self, key: RecordKey, reason: str) -> None:
        say(f"R {'|'.join(key)} {reason}")
        self.box.refused(key, reason)

    def depth(self) -> tuple[int, int]:
        return self.box.depth()


def frames(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    image = np.full((*shape, 3), 200, dtype=np.uint8)
    image += rng.integers(0, 8, size=(*shape, 3), dtype=np.uint8)
    return image


async def queue(box: Outbox, sorter: str, batch: str, n: int) -> None:
    """Submit the session then n stones, one at a time (each durable before the next)."""
    rng = np.random.default_rng(abs(hash(batch)) % 2**32)
    session = f"{batch}_s"
    rec: Record = SessionRecord(sorter, batch, session, {"session_id": session, "pixels_per_mm": 20.0,
                                                         "lot_id": "LOT-K"})
    arrays = {"reference_backlit": frames(rng, (240, 640)), "reference_toplit": frames(rng, (240, 640))}
    for i in range(n + 1):
        if i:
            rec = StoneRecord(sorter, batch, f"S{i:06d}", session, "LOT-K", "2026-03-01T09:30:00+07:00", "v002",
                              (0.5, 0.3, 0.2), (0.6, 0.3, 0.1), "FLIP", "FLIP", 0.5, 2.0, 0.8, "flagged", 20.0, 6.4)
            arrays = {"backlit_crop": frames(rng, (128, 128)), "toplit_crop": frames(rng, (128, 128)),
                      "backlit_full": frames(rng, (240, 640)), "toplit_full": frames(rng, (240, 640))}
        submit = box.submit_session if isinstance(rec, SessionRecord) else box.submit_stone
        fut = submit(rec, arrays)  # type: ignore[arg-type]
        assert fut is not None, "outbox queue full"
        assert await asyncio.wrap_future(fut), "outbox refused a record"
        say("D " + "|".join(rec.key))


async def main(argv: list[str]) -> None:
    directory, secret, trainer, endpoint, sorter, batch, n = argv
    box = Outbox(Path(directory), 10**9)
    public, secret_key = load_secret(Path(secret))
    client = LinkClient(ClientOptions(endpoint=endpoint, server_public_key=load_public(Path(trainer)),
                                      public_key=public, secret_key=secret_key, window=8, heartbeat_s=0.3,
                                      ack_timeout_s=3.0, reconnect_max_s=0.6, sorter_id=sorter), SaysAcks(box))
    say("ready")
    task = asyncio.create_task(client.run())
    try:
        await queue(box, sorter, batch, int(n))
        while box.depth()[0] or client.in_flight:
            await asyncio.sleep(0.1)
        say("EMPTY")
    finally:
        client.stop()
        await asyncio.wait_for(task, 10)
        box.close(10)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
