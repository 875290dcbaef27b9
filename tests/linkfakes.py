"""Small faithful fakes for the link's neighbours: an outbox (OutboxSource) and an inbox (InboxSink)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from sorterd.link import keys
from sorterd.link.records import SESSION_IMAGES, STONE_IMAGES, Record, RecordKey, SessionRecord, StoneRecord, Stored


def png(seed: int = 0, side: int = 8) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def stone(n: int, sorter: str = "sorter-a", **changes: object) -> StoneRecord:
    fields: dict[str, object] = dict(
        sorter_id=sorter, batch="2026-03-01_morning", stone_id=f"S{n:06d}", session_id="2026-03-01_001",
        lot_id="LOT-2026-007", wall_time="2026-03-01T09:30:00+07:00", model_version="v003",
        p_color=(0.6, 0.3, 0.1), p_clarity=(0.5, 0.4, 0.1), decision="FLIP", route="FLIP", confidence=0.5,
        size_mm=2.4, uncertainty=0.8, reason="flagged", pixels_per_mm=42.0, crop_mm=3.0,
        images={name: png(n * 10 + i) for i, name in enumerate(STONE_IMAGES)})
    fields.update(changes)
    return StoneRecord(**fields)  # type: ignore[arg-type]


def session(sorter: str = "sorter-a") -> SessionRecord:
    return SessionRecord(sorter, "2026-03-01_morning", "2026-03-01_001",
                         {"session_id": "2026-03-01_001", "lot_id": "LOT-2026-007", "pixels_per_mm": 42.0},
                         {name: png(900 + i) for i, name in enumerate(SESSION_IMAGES)})


class FakeOutbox:
    """Records in memory; thread-safe as the Protocol says."""

    def __init__(self, records: list[Record]) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[RecordKey, Record] = {r.key: r for r in records}
        self.acks: Counter[RecordKey] = Counter()
        self.refusals: dict[RecordKey, str] = {}

    def pending(self, limit: int, exclude: frozenset[RecordKey]) -> list[Record]:
        with self.lock:
            return [r for k, r in self.waiting.items() if k not in exclude][:limit]

    def acknowledged(self, key: RecordKey) -> None:
        with self.lock:
            self.acks[key] += 1
            self.waiting.pop(key, None)

    def refused(self, key: RecordKey, reason: str) -> None:
        with self.lock:
            self.refusals[key] = reason
            self.waiting.pop(key, None)

    def depth(self) -> tuple[int, int]:
        with self.lock:
            return len(self.waiting), 0


class FakeInbox:
    """Keeps what it is given, once per key; `store` must run off the loop's thread (checked)."""

    def __init__(self, loop_thread: int | None = None) -> None:
        self.loop_thread = loop_thread if loop_thread is not None else threading.get_ident()
        self.kept: dict[RecordKey, tuple[str, Record]] = {}
        self.calls: Counter[RecordKey] = Counter()
        self.seen: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.unavailable_for = 0  # answer "unavailable" to the first N stores

    def store(self, sorter_id: str, record: Record) -> Stored:
        assert threading.get_ident() != self.loop_thread, "store ran on the event loop's thread"
        self.threads.add(threading.get_ident())
        self.calls[record.key] += 1
        if self.unavailable_for > 0:
            self.unavailable_for -= 1
            return Stored("unavailable", "disk full")
        if record.key in self.kept:
            return Stored("duplicate")
        self.kept[record.key] = (sorter_id, record)
        return Stored("stored")

    def sorter_seen(self, sorter_id: str, outbox_entries: int, outbox_bytes: int) -> None:
        self.seen[sorter_id] += 1


class KeySet:
    """A trainer key pair, an allow-list with one sorter, and that sorter's key pair."""

    def __init__(self, root: Path, sorter: str = "sorter-a") -> None:
        self.trainer_public, self.trainer_secret = keys.load_secret(keys.generate(root / "trainer", "trainer")[1])
        self.allowed = root / "allowed"
        pub, sec = keys.generate(root / "sorters", sorter)
        self.allowed.mkdir()
        (self.allowed / pub.name).write_bytes(pub.read_bytes())
        self.sorter_public, self.sorter_secret = keys.load_secret(sec)
