"""The sorter's durable outbox: records for the trainer, on disk before they are sent (§5.1).

    pipeline (loop) ──submit──▶ [bounded queue] ──▶ outbox thread: PNG encode, SQLite insert, fsync
    link client (its thread) ──pending / acknowledged / refused──▶ same thread, answered by futures

One thread owns the SQLite connection (the Moonraker pattern): every call is a job
on its queue, answered through a `concurrent.futures.Future`; `submit_*` never waits
(the event loop calls it), the client's calls wait in the client's own thread.

Storage: ``<outbox_dir>/outbox.db``, WAL, ``synchronous=FULL``: a record and all its
images are one transaction, committed (and so fsynced) before its future says True.
A SIGKILL at any instant leaves each record wholly there or wholly absent.  The db
persists across runs: a restarted sorter resends what is still pending.

Priority (lower sends first): 0 session record (§2.4 meta + reference frames), 1 a
flagged stone (§5.2), 2 a drift stone (every Nth confident one).  `pending` returns
highest priority first, oldest first within it, so a session record always goes
before its stones.

Quota (`link.outbox_quota_mb`, payload bytes: the JSON of the record and its PNGs):
a new record that does not fit evicts the oldest of the least important pending
stones no more important than itself (drift before flagged); a session record goes
only when no stone of its session remains (and never for a stone of that session).
If it still does not fit, the new record is dropped.  Every drop is counted by
reason and logged (at most once per LOG_EVERY_S per reason):

* ``queue_full``  -- the submit queue was full (the disk is slower than the stones);
* ``quota``       -- evicted, or a new record that could not fit;
* ``refused``     -- the trainer refused it for good: moved to the ``refused`` table,
  kept for an operator, outside the quota (not deleted);
* ``duplicate``   -- its key is already pending (a record is stored once);
* ``error``       -- encoding or the disk failed;
* ``shutdown``    -- still queued when `close` ran out of time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.link.records import Record, RecordKey, SessionRecord, StoneRecord

log = logging.getLogger(__name__)

DB_NAME = "outbox.db"
SCHEMA_VERSION = 1
LOG_EVERY_S = 10.0  # a drop reason is logged at most this often (with the count since)
PRIORITY = {"session": 0, "flagged": 1, "drift": 2}
DROP_REASONS = ("queue_full", "quota", "refused", "duplicate", "error", "shutdown")

Connect = Callable[[Path], sqlite3.Connection]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, across runs
    sorter_id TEXT NOT NULL, batch TEXT NOT NULL, ident TEXT NOT NULL,  -- the RecordKey
    kind TEXT NOT NULL CHECK (kind IN ('stone', 'session')),
    session TEXT NOT NULL,  -- the session it belongs to (a session record: its own)
    priority INTEGER NOT NULL,
    meta TEXT NOT NULL,  -- the record's fields but its images, JSON
    size INTEGER NOT NULL,  -- bytes of meta and images (the quota's unit)
    UNIQUE (sorter_id, batch, ident)
);
CREATE INDEX IF NOT EXISTS entries_order ON entries (priority, id);
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY, sorter_id TEXT NOT NULL, batch TEXT NOT NULL, ident TEXT NOT NULL,
    kind TEXT NOT NULL, session TEXT NOT NULL, priority INTEGER NOT NULL, meta TEXT NOT NULL,
    size INTEGER NOT NULL, reason TEXT NOT NULL, refused_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    entry INTEGER NOT NULL, name TEXT NOT NULL, png BLOB NOT NULL, PRIMARY KEY (entry, name)
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class OutboxError(OSError):
    """The outbox cannot be opened (its folder or database): the message says which and why."""


def connect_db(path: Path) -> sqlite3.Connection:
    """The outbox database (WAL, synchronous=FULL: a commit is on disk when it returns)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


@dataclass
class _Put:
    record: Record
    arrays: Mapping[str, np.ndarray]
    future: Future[bool]


@dataclass
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any] = field(default_factory=Future)


class _DropLog:
    """Drops counted by reason, logged at most once per LOG_EVERY_S per reason (with the count since)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self._unlogged = dict.fromkeys(DROP_REASONS, 0)
        self._logged_at = dict.fromkeys(DROP_REASONS, -LOG_EVERY_S)

    def drop(self, reason: str, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[reason] += n
            self._unlogged[reason] += n
            now = time.monotonic()
            if now - self._logged_at[reason] < LOG_EVERY_S:
                return
            count, self._unlogged[reason], self._logged_at[reason] = self._unlogged[reason], 0, now
        log.warning("outbox: %d record(s) dropped (%s), the last: %s", count, reason, what)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class Outbox:
    """The durable outbox (see the module docstring); implements `OutboxSource` and the
    pipeline's `ReviewQueue`.  Counters: `queued`, `delivered` and the depth are written by
    the outbox thread only and read by anyone (plain ints, replaced whole)."""

    def __init__(self, directory: Path, quota_bytes: int, *, queue_size: int = 64,
                 close_timeout_s: float = 5.0, connect: Connect | None = None) -> None:
        self.dir = directory
        self.db_path = directory / DB_NAME
        self.quota_bytes = quota_bytes
        self.queue_size = queue_size
        self.close_timeout_s = close_timeout_s
        self.drops = _DropLog()
        self.queued = 0  # records made durable during this run
        self.delivered = 0  # records acknowledged during this run
        self._depth = (0, 0)  # (entries, bytes) pending: replaced whole, so a reader never sees half an update
        self._jobs: queue.Queue[_Put | _Call | None] = queue.Queue()
        self._puts_waiting = 0  # _Put jobs in _jobs (bounded by queue_size); under _lock
        self._current: _Put | None = None  # the record the outbox thread is writing; under _lock
        self._lock = threading.Lock()
        self._closed = False
        self._connect = connect or connect_db  # (looked up now: a test swaps the module's for a slow disk)
        self._check(self._connect)
        self._thread = threading.Thread(target=self._serve, name="sorterd-outbox", daemon=True)
        self._thread.start()

    # -- opening ----------------------------------------------------------------

    def _check(self, connect: Connect) -> None:
        """Open (and make) the database once here, so that a bad folder fails the run's start."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            conn = connect(self.db_path)
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = conn.execute("SELECT value FROM info WHERE key = 'schema_version'").fetchone()[0]
            entries, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
            self._depth = (int(entries), int(size))
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"link.outbox_dir {str(self.dir)!r}: cannot open {DB_NAME}: {exc}") from None
        conn.close()  # the outbox thread opens its own: it alone uses it from now on
        if version != str(SCHEMA_VERSION):
            raise OutboxError(f"{self.db_path}: schema version {version}, this sorterd reads {SCHEMA_VERSION}")

    # -- the loop's side: never waits --------------------------------------------

    def submit_stone(self, record: StoneRecord, arrays: Mapping[str, np.ndarray]) -> Future[bool] | None:
        """Queue a stone (its images as arrays, PNG-encoded by the outbox thread).  None: the
        queue was full (counted, logged); else a future that is True once it is on disk."""
        return self._submit(record, arrays)

    def submit_session(self, record: SessionRecord, arrays: Mapping[str, np.ndarray]) -> Future[bool] | None:
        """Queue a session record (§2.4 meta + reference frames), before its stones."""
        return self._submit(record, arrays)

    def _submit(self, record: Record, arrays: Mapping[str, np.ndarray]) -> Future[bool] | None:
        fut: Future[bool] = Future()
        with self._lock:  # with close(): nothing is queued behind the end
            full = self._closed or self._puts_waiting >= self.queue_size
            if not full:
                self._puts_waiting += 1
                self._jobs.put(_Put(record, arrays, fut))
        if full:
            self.drops.drop("shutdown" if self._closed else "queue_full", _describe(record.key))
            return None
        return fut

    # -- OutboxSource (the link client's thread): waits for the outbox thread ----

    def pending(self, limit: int, exclude: frozenset[RecordKey]) -> list[Record]:
        return self._call(lambda conn: _read_pending(conn, limit, exclude), [])

    def acknowledged(self, key: RecordKey) -> None:
        self._call(lambda conn: self._delete(conn, key), None)

    def refused(self, key: RecordKey, reason: str) -> None:
        self._call(lambda conn: self._set_aside(conn, key, reason), None)

    def depth(self) -> tuple[int, int]:
        return self._depth

    def refused_count(self) -> int:
        """Records the trainer refused for good, kept aside (all runs)."""
        return int(self._call(lambda conn: conn.execute("SELECT COUNT(*) FROM refused").fetchone()[0], 0))

    def pending_by_kind(self) -> dict[str, int]:
        """Pending records by why they are sent (flagged, drift) and sessions; after close too
        (then read through a connection of its own)."""
        if not self._closed:
            return dict(self._call(_count_by_kind, None) or {})
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return _count_by_kind(conn)
        finally:
            conn.close()

    def dropped_counts(self) -> dict[str, int]:
        return self.drops.snapshot()

    def _call(self, fn: Callable[[sqlite3.Connection], Any], closed: Any) -> Any:
        job = _Call(fn)
        with self._lock:  # with close(): nothing is queued behind the end
            if self._closed:
                return closed
            self._jobs.put(job)
        return job.future.result()

    # -- the outbox thread --------------------------------------------------------

    def _serve(self) -> None:
        try:
            conn = self._connect(self.db_path)
        except (OSError, sqlite3.Error) as exc:
            log.error("outbox: cannot open %s in its thread: %s: nothing for the trainer is kept", self.db_path, exc)
            self._fail_all(OutboxError(f"{self.db_path}: {exc}"))
            return
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Put):
                with self._lock:
                    self._puts_waiting -= 1
                    self._current = job
                done = self._store(conn, job.record, job.arrays)
                with self._lock:
                    self._current = None
                    if not job.future.done():  # close() gave up on it meanwhile (counted lost)
                        job.future.set_result(done)
                continue
            try:
                job.future.set_result(job.fn(conn))
            except Exception as exc:  # noqa: BLE001 -- the caller gets the error, the thread goes on
                _rollback(conn)
                job.future.set_exception(exc)
        conn.close()

    def _store(self, conn: sqlite3.Connection, record: Record, arrays: Mapping[str, np.ndarray]) -> bool:
        what = _describe(record.key)
        try:
            images = {name: _png(img) for name, img in arrays.items()}
        except (cv2.error, ValueError) as exc:
            self.drops.drop("error", f"{what}: PNG encoding failed: {exc}")
            return False
        meta = json.dumps(_meta(record), separators=(",", ":"))
        size = len(meta) + sum(len(b) for b in images.values())
        kind = "session" if isinstance(record, SessionRecord) else "stone"
        prio = PRIORITY["session"] if isinstance(record, SessionRecord) else PRIORITY[record.reason]
        try:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM entries WHERE sorter_id = ? AND batch = ? AND ident = ?",
                            record.key).fetchone():
                conn.execute("ROLLBACK")
                self.drops.drop("duplicate", what)
                return False
            evicted = self._make_room(conn, size, prio, record.session_id)
            if evicted is None:
                conn.execute("ROLLBACK")
                self.drops.drop("quota", f"{what} ({size} bytes) does not fit in link.outbox_quota_mb")
                return False
            cur = conn.execute("INSERT INTO entries (sorter_id, batch, ident, kind, session, priority, meta, size) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*record.key, kind, record.session_id, prio, meta, size))
            conn.executemany("INSERT INTO images VALUES (?, ?, ?)",
                             [(cur.lastrowid, name, png) for name, png in images.items()])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            self.drops.drop("error", f"{what}: the disk refused it: {exc}")
            return False
        entries, total = self._depth
        self._depth = (entries + 1 - len(evicted), total + size - sum(evicted))
        self.queued += 1
        for _ in evicted:
            self.drops.drop("quota", f"evicted for {what}")
        return True

    def _make_room(self, conn: sqlite3.Connection, size: int, prio: int, session: str) -> list[int] | None:
        """Evict until `size` more bytes fit (inside the caller's transaction): the sizes evicted,
        or None if it cannot fit (nothing is evicted then: the caller rolls back)."""
        total, evicted = self._depth[1], []
        while total + size > self.quota_bytes:
            victim = conn.execute(
                "SELECT id, size FROM entries WHERE kind = 'stone' AND priority >= ? "
                "ORDER BY priority DESC, id LIMIT 1", (max(prio, PRIORITY["flagged"]),)).fetchone()
            victim = victim or conn.execute(
                "SELECT id, size FROM entries AS e WHERE kind = 'session' AND session != ? AND NOT EXISTS "
                "(SELECT 1 FROM entries AS s WHERE s.kind = 'stone' AND s.sorter_id = e.sorter_id "
                "AND s.batch = e.batch AND s.session = e.session) ORDER BY id LIMIT 1", (session,)).fetchone()
            if victim is None:
                return None
            conn.execute("DELETE FROM entries WHERE id = ?", (victim[0],))
            conn.execute("DELETE FROM images WHERE entry = ?", (victim[0],))
            total -= victim[1]
            evicted.append(victim[1])
        return evicted

    def _delete(self, conn: sqlite3.Connection, key: RecordKey) -> None:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT id, size FROM entries WHERE sorter_id = ? AND batch = ? AND ident = ?", key).fetchone()
        if row is None:
            conn.execute("ROLLBACK")  # acknowledged before (a resend's second ack): nothing to do
            return
        conn.execute("DELETE FROM entries WHERE id = ?", (row[0],))
        conn.execute("DELETE FROM images WHERE entry = ?", (row[0],))
        conn.execute("COMMIT")
        self._depth = (self._depth[0] - 1, self._depth[1] - row[1])
        self.delivered += 1

    def _set_aside(self, conn: sqlite3.Connection, key: RecordKey, reason: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT id, size FROM entries WHERE sorter_id = ? AND batch = ? AND ident = ?", key).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            return
        conn.execute("INSERT INTO refused SELECT id, sorter_id, batch, ident, kind, session, priority, meta, size, ?, ? "
                     "FROM entries WHERE id = ?", (reason, time.strftime("%Y-%m-%dT%H:%M:%S%z"), row[0]))
        conn.execute("DELETE FROM entries WHERE id = ?", (row[0],))
        conn.execute("COMMIT")
        self._depth = (self._depth[0] - 1, self._depth[1] - row[1])
        self.drops.drop("refused", f"{_describe(key)}: {reason}")

    def _fail_all(self, exc: OutboxError) -> None:
        """No database: every job fails (records counted as errors) until close."""
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Put):
                with self._lock:
                    self._puts_waiting -= 1
                self.drops.drop("error", f"{_describe(job.record.key)}: {exc}")
                job.future.set_result(False)
            else:
                job.future.set_exception(exc)

    # -- closing ------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> int:
        """Write what is queued and stop, within `timeout` (default close_timeout_s) whatever the
        disk does.  Returns how many queued records could not be written (counted, said loudly)."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            self._jobs.put(None)
        self._thread.join(self.close_timeout_s if timeout is None else timeout)
        if not self._thread.is_alive():
            return 0
        lost = 0
        with self._lock:
            if self._current is not None:  # stuck in the disk: it may still land there, or not
                lost += 1
                self._current.future.set_result(False)
            while True:  # the writer is stuck in the disk: what it has not taken is lost
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, _Put):
                    lost += 1
                    job.future.set_result(False)
                elif isinstance(job, _Call):
                    job.future.set_exception(OutboxError("the outbox closed"))
            self._puts_waiting = 0
        if lost:
            self.drops.drop("shutdown", f"{lost} record(s) still queued when the outbox closed", lost)
            log.error("outbox: %d record(s) for the trainer could not be written before the exit "
                      "(the disk of %s did not keep up)", lost, self.dir)
        return lost

    def summary(self) -> dict[str, Any]:
        """This run's figures for the run summary and batch.json (call after close)."""
        entries, size = self.depth()
        try:
            by_kind = self.pending_by_kind()
        except sqlite3.Error as exc:
            log.error("outbox: cannot count what waits in %s: %s", self.db_path, exc)
            by_kind = {}
        return {"outbox": str(self.db_path), "queued": self.queued, "delivered": self.delivered,
                "dropped": self.dropped_counts(),
                "pending": {"entries": entries, "bytes": size, **by_kind}}


def _count_by_kind(conn: sqlite3.Connection) -> dict[str, int]:
    names = {v: k for k, v in PRIORITY.items()}
    out = dict.fromkeys(PRIORITY, 0)
    for prio, n in conn.execute("SELECT priority, COUNT(*) FROM entries GROUP BY priority"):
        out[names[prio]] = n
    return out


def _read_pending(conn: sqlite3.Connection, limit: int, exclude: frozenset[RecordKey]) -> list[Record]:
    rows = conn.execute("SELECT id, sorter_id, batch, ident, kind, meta FROM entries ORDER BY priority, id")
    chosen = list(itertools.islice(((r[0], r[4], r[5]) for r in rows if (r[1], r[2], r[3]) not in exclude), limit))
    out: list[Record] = []
    for entry, kind, meta in chosen:
        images = {name: bytes(png) for name, png in conn.execute("SELECT name, png FROM images WHERE entry = ?", (entry,))}
        out.append(_record(kind, json.loads(meta), images))
    return out


def _meta(record: Record) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "images"}


def _record(kind: str, meta: dict[str, Any], images: dict[str, bytes]) -> Record:
    if kind == "session":
        return SessionRecord(**meta, images=images)
    meta["p_color"], meta["p_clarity"] = tuple(meta["p_color"]), tuple(meta["p_clarity"])
    return StoneRecord(**meta, images=images)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cv2.imencode refused an image of shape {image.shape}")
    return bytes(buf.tobytes())


def _describe(key: RecordKey) -> str:
    return "/".join(key)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("outbox: rollback failed")
