"""The link's outbox: priority order, quota drops by reason, idempotent acks, refused records
kept aside, persistence across reopen, a full queue and a stuck disk never blocking the caller."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd.domain import uncertainty_score
from sorterd.link.outbox import DB_NAME, Outbox, OutboxError, connect_db
from sorterd.link.records import STONE_IMAGES, Record, SessionRecord, StoneRecord
from sorterd.metrics import Metrics


def arrays(seed: int, names: tuple[str, ...] = STONE_IMAGES, px: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 256, (px, px, 3), dtype=np.uint8) for n in names}


def stone(sid: str, reason: str = "flagged", session: str = "s1", batch: str = "b1") -> StoneRecord:
    return StoneRecord(
        sorter_id="sorter-1", batch=batch, stone_id=sid, session_id=session, lot_id="LOT-1",
        wall_time="2026-02-15T09:30:00.000+07:00", model_version="v002", p_color=(0.5, 0.3, 0.2),
        p_clarity=(0.6, 0.3, 0.1), decision="FLIP", route="FLIP", confidence=0.5, size_mm=2.5,
        uncertainty=uncertainty_score((0.5, 0.3, 0.2), (0.6, 0.3, 0.1)), reason=reason,  # type: ignore[arg-type]
        pixels_per_mm=20.0, crop_mm=6.4)


def session(sid: str = "s1", batch: str = "b1") -> SessionRecord:
    return SessionRecord(sorter_id="sorter-1", batch=batch, session_id=sid, meta={"session_id": sid, "pixels_per_mm": 20.0})


def put(box: Outbox, rec: Record, seed: int = 0) -> bool:
    if isinstance(rec, SessionRecord):
        fut = box.submit_session(rec, arrays(seed, ("reference_backlit", "reference_toplit"), px=48))
    else:
        fut = box.submit_stone(rec, arrays(seed))
    assert fut is not None
    return fut.result(timeout=10)


def ids(records: list[Record]) -> list[str]:
    return [r.key[2] for r in records]


def test_round_trip_keeps_every_field_and_the_pixels(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    rec = stone("S000001")
    img = arrays(3)
    fut = box.submit_stone(rec, img)
    assert fut is not None and fut.result(timeout=10)
    (got,) = box.pending(10, frozenset())
    assert isinstance(got, StoneRecord)
    assert {k: v for k, v in vars(got).items() if k != "images"} == {k: v for k, v in vars(rec).items() if k != "images"}
    assert set(got.images) == set(STONE_IMAGES)
    for name, png in got.images.items():  # lossless PNG: the very pixels the model saw
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(decoded, img[name])
    entries, size = box.depth()
    assert entries == 1 and size >= sum(len(b) for b in got.images.values())
    box.close()


def test_pending_is_priority_then_age_sessions_before_stones(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    for rec in (stone("D1", "drift"), session("s1"), stone("F1"), stone("D2", "drift"), stone("F2"),
                session("s2"), stone("F3", session="s2")):
        assert put(box, rec)
    assert ids(box.pending(100, frozenset())) == ["session:s1", "session:s2", "F1", "F2", "F3", "D1", "D2"]
    assert ids(box.pending(3, frozenset())) == ["session:s1", "session:s2", "F1"]
    skip = frozenset({("sorter-1", "b1", "session:s1"), ("sorter-1", "b1", "F1")})
    assert ids(box.pending(3, skip)) == ["session:s2", "F2", "F3"]
    box.close()


def test_ack_is_idempotent(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    assert put(box, stone("F1")) and put(box, stone("F2"))
    before = box.depth()
    key = ("sorter-1", "b1", "F1")
    box.acknowledged(key)
    after = box.depth()
    box.acknowledged(key)  # a resend's second ack
    box.acknowledged(("sorter-1", "b1", "never-sent"))
    assert box.depth() == after and after[0] == before[0] - 1 and after[1] < before[1]
    assert ids(box.pending(10, frozenset())) == ["F2"]
    assert box.delivered == 1
    box.close()


def test_refused_is_kept_aside_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    assert put(box, stone("F1")) and put(box, stone("F2"))
    box.refused(("sorter-1", "b1", "F1"), "schema: unknown field")
    box.refused(("sorter-1", "b1", "F1"), "again")  # already aside: no second count
    assert ids(box.pending(10, frozenset())) == ["F2"]
    assert box.dropped_counts()["refused"] == 1 and box.refused_count() == 1
    assert box.depth()[0] == 1
    box.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    (entry, reason), = conn.execute("SELECT id, reason FROM refused").fetchall()
    assert reason == "schema: unknown field"
    assert conn.execute("SELECT COUNT(*) FROM images WHERE entry = ?", (entry,)).fetchone()[0] == len(STONE_IMAGES)


def test_quota_drops_drift_first_then_oldest_flagged_never_a_live_session(tmp_path: Path) -> None:
    probe = Outbox(tmp_path / "probe", 10**8)
    assert put(probe, stone("X"))
    one = probe.depth()[1]  # every stone here has the same size
    probe.close()
    box = Outbox(tmp_path / "box", int(one * 3.5))
    assert put(box, stone("F1")) and put(box, stone("D1", "drift")) and put(box, stone("F2"))
    assert put(box, stone("F3"))  # evicts the drift stone, not the older flagged one
    assert ids(box.pending(10, frozenset())) == ["F1", "F2", "F3"]
    assert box.dropped_counts()["quota"] == 1
    assert not put(box, stone("D2", "drift"))  # a drift stone never pushes out a flagged one
    assert box.dropped_counts()["quota"] == 2
    assert put(box, stone("F4"))  # the oldest flagged goes
    assert ids(box.pending(10, frozenset())) == ["F2", "F3", "F4"]
    assert box.depth()[1] <= box.quota_bytes
    box.close()


def test_quota_drops_a_session_record_only_when_none_of_its_stones_remain(tmp_path: Path) -> None:
    probe = Outbox(tmp_path / "probe", 10**8)
    assert put(probe, session("s1"))
    sess_size = probe.depth()[1]
    assert put(probe, stone("X"))
    stone_size = probe.depth()[1] - sess_size
    probe.close()
    assert sess_size > 2 * stone_size  # (its frames are larger)
    box = Outbox(tmp_path / "box", sess_size + stone_size * 3 // 2)  # one session record and one stone
    assert put(box, session("s1")) and put(box, stone("A", session="s1"))
    assert put(box, stone("B", session="s1"))  # evicts stone A; s1's record stays for B
    assert ids(box.pending(10, frozenset())) == ["session:s1", "B"]
    assert put(box, session("s2"))  # evicts B, then s1's record (no stone of s1 left)
    assert ids(box.pending(10, frozenset())) == ["session:s2"]
    assert box.dropped_counts()["quota"] == 3  # A, B, s1's record
    box.close()


def test_a_record_bigger_than_the_quota_is_dropped_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 100)
    assert not put(box, stone("F1"))
    assert box.dropped_counts()["quota"] == 1 and box.depth() == (0, 0)
    box.close()


def test_duplicate_key_is_stored_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    assert put(box, stone("F1"))
    assert not put(box, stone("F1"))
    assert box.depth()[0] == 1 and box.dropped_counts()["duplicate"] == 1
    box.close()


def test_reopen_keeps_pending_order_and_depth(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**8)
    for rec in (session("s1"), stone("F1"), stone("D1", "drift"), stone("F2")):
        assert put(box, rec)
    box.acknowledged(("sorter-1", "b1", "F1"))
    depth = box.depth()
    box.close()
    again = Outbox(tmp_path, 10**8)
    assert again.depth() == depth
    assert ids(again.pending(10, frozenset())) == ["session:s1", "F2", "D1"]
    assert put(again, stone("F3", batch="b2"))  # arrival order continues after the old entries
    assert ids(again.pending(10, frozenset()))[-2:] == ["F3", "D1"]
    assert again.pending_by_kind() == {"session": 1, "flagged": 2, "drift": 1}
    again.close()
    assert again.pending_by_kind() == {"session": 1, "flagged": 2, "drift": 1}  # read after close too


class _Gate:
    """A disk that hangs: every transaction of the outbox thread waits until `open` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.armed = False

    def connect(self, path: Path) -> sqlite3.Connection:
        gate = self

        class Hanging(sqlite3.Connection):
            def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
                if gate.armed and sql.startswith("BEGIN"):
                    gate.open.wait()
                return super().execute(sql, *args)

        conn = sqlite3.connect(str(path), isolation_level=None, factory=Hanging)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn


def test_full_queue_drops_at_once_and_counts(tmp_path: Path) -> None:
    gate = _Gate()
    box = Outbox(tmp_path, 10**8, queue_size=4, connect=gate.connect)
    gate.armed = True
    t = time.perf_counter()
    futs = [box.submit_stone(stone(f"F{i}"), arrays(i)) for i in range(10)]
    assert time.perf_counter() - t < 2.0  # never waited for the disk (a generous bound: a loaded box)
    refused = sum(f is None for f in futs)
    # One is in the thread's hands (stuck in the disk), four wait in the queue.
    assert refused in (5, 6) and box.dropped_counts()["queue_full"] == refused
    gate.open.set()
    assert all(f.result(timeout=10) for f in futs if f is not None)
    assert box.depth()[0] == 10 - refused
    box.close()


def test_close_with_a_stuck_disk_is_bounded_and_counts_what_it_lost(tmp_path: Path) -> None:
    gate = _Gate()
    box = Outbox(tmp_path, 10**8, queue_size=8, connect=gate.connect)
    gate.armed = True
    futs = [box.submit_stone(stone(f"F{i}"), arrays(i)) for i in range(5)]
    time.sleep(0.1)  # the thread takes the first and hangs in the disk
    t = time.monotonic()
    lost = box.close(timeout=0.3)
    assert time.monotonic() - t < 3.0
    assert lost >= 4 and box.dropped_counts()["shutdown"] == lost
    assert sum(f is not None and f.done() and not f.result() for f in futs) >= lost
    assert box.submit_stone(stone("late"), arrays(0)) is None  # closed: refused, counted
    gate.open.set()


def test_an_unusable_folder_is_refused_with_its_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutboxError, match=r"link\.outbox_dir .*file"):
        Outbox(tmp_path / "file", 10**8)


def test_connect_db_is_durable() -> None:
    conn = connect_db(Path(":memory:"))
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_metrics_read_the_outbox_at_scrape_time(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    box = Outbox(tmp_path, 100)
    m = Metrics()
    m.watch_outbox(box)
    assert not put(box, stone("F1"))  # too big: quota
    text = generate_latest(m.registry).decode()
    assert "sorterd_outbox_entries 0.0" in text
    assert 'sorterd_link_dropped_total{reason="quota"} 1.0' in text
    box.close()


def test_uncertainty_score_is_the_section_5_3_entropy() -> None:
    third = [1 / 3] * 3
    assert uncertainty_score(third, third) == pytest.approx(1.0)
    assert uncertainty_score([1, 0, 0], [0, 1, 0]) == pytest.approx(0.0, abs=1e-6)
    p, q = np.array([0.9, 0.05, 0.05]), np.array([0.6, 0.3, 0.1])
    h = lambda v: -np.sum(v * np.log2(v))  # noqa: E731
    assert uncertainty_score(p, q) == pytest.approx((h(p) + h(q)) / (2 * np.log2(3)))
