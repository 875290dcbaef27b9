"""The production log of a batch (§7.1): SQLite rows, thumbnails, flagged images.

One thread owns the SQLite connection; the event loop only puts finished
rows on a bounded queue (never blocks).  Rows are committed in small batches
(WAL, synchronous=NORMAL): a SIGKILL loses at most the rows of the last
commit interval, and the database always opens clean because every row is
one INSERT inside a transaction.  Images are encoded by a second thread so
a slow disk never delays a commit.  A full or failing disk is survived, and
what it cost is counted (`Recorder`).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from sorterd.data.files import write_png_atomic
from sorterd.data.session import PairTimes, SessionWriter, stone_order
from sorterd.sorting.liveness import Beat

if TYPE_CHECKING:  # the row's sources; only their fields are read here
    from sorterd.controller.outputs import Pulse
    from sorterd.parts.camera import FramePair
    from sorterd.parts.inference import Prediction
    from sorterd.sorting.decide import Decision
    from sorterd.sorting.segment import Observation

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: the strobes' actual edges per stone; 3: the `unseen` table


@dataclass
class StoneRow:
    stone_id: str
    capture_seq: int
    t_trigger_ns: int
    t_backlit_ns: int
    t_toplit_ns: int
    t_decided_ns: int
    x_mm: float
    y_mm: float
    speed_mm_s: float
    size_mm: float
    length_mm: float
    cluster: int
    p_blue: float | None
    p_light: float | None
    p_inky: float | None
    p_transparent: float | None
    p_translucent: float | None
    p_opaque: float | None
    color: str | None
    clarity: str | None
    confidence: float
    bin: str  # the decided bin
    route: str  # where the machine actually sent it (REJECT after a deadline miss)
    reason: str
    flagged: int
    deadline_miss: int
    planned_on_ns: int | None
    planned_off_ns: int | None
    actual_on_ns: int | None
    actual_off_ns: int | None
    valve_status: str
    model_version: str
    wall_time: str
    # The lights' actual edges for this stone's frames (as the strobe device reported them).
    backlit_on_ns: int | None = None
    backlit_off_ns: int | None = None
    toplit_on_ns: int | None = None
    toplit_off_ns: int | None = None


def stone_row(sid: str, pair: FramePair, obs: Observation, pred: Prediction | None, dec: Decision,
              pulse: Pulse | None, edges: Mapping[str, int | None], *, t_decided_ns: int,
              model_version: str, wall_time: str, route: str | None = None) -> StoneRow:
    """A decided object's row as it is when its pulse is handed to the valves.

    Pure: the caller passes the instants (`t_decided_ns`, `wall_time`), so the
    same inputs always give the same row.  An unclassified object (`pred` None:
    a cluster, a lighting fault...) has no probabilities.  `route` starts as
    given (the neighbour rules' route; the decided bin when None) and `valve_status` as "scheduled" (or "no pulse"); the pulse's
    outcome fills in the rest.  `edges` are the lights' actual edges for its
    frames (`lights.strobe_edges`: `backlit_on_ns`..., None where not reported).
    """
    pc = [float(v) for v in pred.p_color] if pred is not None else [None] * 3
    pk = [float(v) for v in pred.p_clarity] if pred is not None else [None] * 3
    return StoneRow(
        stone_id=sid, capture_seq=pair.seq, t_trigger_ns=pair.trigger_ns,
        t_backlit_ns=pair.backlit.t_ns, t_toplit_ns=pair.toplit.t_ns, t_decided_ns=t_decided_ns,
        x_mm=obs.x_mm, y_mm=obs.y_mm, speed_mm_s=obs.speed_mm_s, size_mm=obs.size_mm,
        length_mm=obs.length_mm, cluster=int(obs.cluster),
        p_blue=pc[0], p_light=pc[1], p_inky=pc[2],
        p_transparent=pk[0], p_translucent=pk[1], p_opaque=pk[2],
        color=dec.color, clarity=dec.clarity, confidence=dec.confidence, bin=dec.bin,
        route=dec.bin if route is None else route, reason=dec.reason, flagged=int(dec.flagged), deadline_miss=0,
        planned_on_ns=pulse.start_ns if pulse else None, planned_off_ns=pulse.end_ns if pulse else None,
        actual_on_ns=None, actual_off_ns=None, valve_status="no pulse" if pulse is None else "scheduled",
        model_version=model_version, wall_time=wall_time,
        backlit_on_ns=edges.get("backlit_on_ns"), backlit_off_ns=edges.get("backlit_off_ns"),
        toplit_on_ns=edges.get("toplit_on_ns"), toplit_off_ns=edges.get("toplit_off_ns"),
    )


@dataclass
class UnseenRow:
    """A stone the trigger counted that no decision explains (sorterd/ledger.py): it passed
    the camera unseen, got no pulse and fell to REJECT.  Its record is this row."""

    trigger_ns: int  # its trigger edge, host monotonic ns
    counted_ns: int  # when the ledger gave up on explaining it
    wall_time: str
    reason: str


UNSEEN_SQL = ("CREATE TABLE IF NOT EXISTS unseen (trigger_ns INTEGER PRIMARY KEY, counted_ns INTEGER NOT NULL, "
              "wall_time TEXT NOT NULL, reason TEXT NOT NULL)")
INSERT_UNSEEN_SQL = "INSERT OR REPLACE INTO unseen VALUES (?, ?, ?, ?)"


def _create_sql() -> str:
    cols = []
    for f in fields(StoneRow):
        base = str(f.type).split("|")[0].strip()
        sql_type = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}[base]
        null = "" if "None" in str(f.type) else " NOT NULL"
        key = " PRIMARY KEY" if f.name == "stone_id" else ""
        cols.append(f"{f.name} {sql_type}{null}{key}")
    return "CREATE TABLE IF NOT EXISTS stones (\n  " + ",\n  ".join(cols) + "\n)"


COLUMNS = [f.name for f in fields(StoneRow)]
INSERT_SQL = f"INSERT OR REPLACE INTO stones ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def open_db(path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    """The batch database, its tables made; `factory` is the connection class (a test's failing disk)."""
    conn = sqlite3.connect(str(path), check_same_thread=True, factory=factory)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(_create_sql())
    conn.execute(UNSEEN_SQL)
    conn.execute("CREATE TABLE IF NOT EXISTS batch (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT OR REPLACE INTO batch VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    conn.commit()
    return conn


def make_batch_dir(log_dir: Path, name: str) -> Path:
    """production_logs/batch_<name>/, never reusing an existing folder."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = log_dir / f"batch_{name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    (path / "thumbnails").mkdir(parents=True)
    (path / "flagged").mkdir()
    return path


@dataclass(frozen=True)
class ImageJob:
    stone_id: str
    thumbnail: np.ndarray | None  # HWC BGR, resized to thumbnail_px high by the writer
    full: dict[str, np.ndarray] | None  # mode -> full frame, flagged stones only
    # The raw pair for a recorded session (`run --record`): backlit, toplit, times.
    raw: tuple[np.ndarray, np.ndarray, PairTimes] | None = None


class RecordError(Exception):
    """The batch database cannot be opened: the run must not start (nothing would be logged)."""


# What the recorder can lose, the `what` of sorterd_record_lost_total.  Stone records:
# rows (table stones), unseen (table unseen), decisions (`run --decisions` lines).
# Images, one per stone (or recorded pair): thumbnails, flagged_images, pairs.
RECORD_KINDS = ("rows", "unseen", "decisions")
IMAGE_KINDS = ("thumbnails", "flagged_images", "pairs")
LOST_KINDS = RECORD_KINDS + IMAGE_KINDS
RETRY_S = 0.5  # a write the database refused is retried this often
MAX_BATCH = 256  # rows per transaction
LOG_EVERY_S = 10.0  # a failure that comes and goes is logged at most this often
_POLL_S = 0.1  # how often a waiting writer thread looks whether the recorder is closing

Connect = Callable[[Path], sqlite3.Connection]


def _kind(row: StoneRow | UnseenRow) -> str:
    return "rows" if isinstance(row, StoneRow) else "unseen"


class Recorder:
    """Owns the batch folder; `submit` and `submit_images` are called from the loop.

    A full or failing disk never stops the sorter and never hangs it: nothing on
    the loop waits for a disk.  Rows the database refuses stay in a buffer of
    `queue_size` rows and are retried every RETRY_S until the disk takes them
    again; rows beyond the buffer go to the spill file, or, if that fails too,
    are lost.  Below `min_free_bytes` free, images are skipped so the rows keep
    their room.  Every row and image not kept is counted in `lost` (logged once
    per streak, not per stone).  `close` returns within `close_timeout_s` even if
    a writer is stuck inside the disk; what it could not settle counts as lost.
    """

    def __init__(self, batch_dir: Path, commit_interval_s: float, queue_size: int, thumbnail_px: int = 96,
                 session: SessionWriter | None = None, decisions: Path | None = None, *,
                 min_free_bytes: int = 0, close_timeout_s: float = 5.0, connect: Connect | None = None) -> None:
        self.thumbnail_px = thumbnail_px
        self.session = session  # written by the image thread only
        self.decisions = DecisionsFile(decisions) if decisions is not None else None  # SQLite thread only
        self.dir = batch_dir
        self.db_path = batch_dir / "stones.db"
        self.commit_interval_s = commit_interval_s
        self.min_free_bytes = min_free_bytes
        self.close_timeout_s = close_timeout_s
        self.buffer_size = queue_size  # rows the writer holds while the database refuses them
        self._batch = min(MAX_BATCH, queue_size)
        self._connect = connect or open_db
        self._rows: queue.Queue[StoneRow | UnseenRow | None] = queue.Queue(maxsize=queue_size)
        self._images: queue.Queue[ImageJob | None] = queue.Queue(maxsize=256)
        # Counters: written by the loop thread (submitted, overflow) or the writer
        # threads (written, spilled, errors, buffered); read by anyone for metrics.
        self.rows_overflow = 0
        self.images_overflow = 0
        self.rows_written = 0
        self.unseen_written = 0
        self.rows_spilled = 0
        self.images_low_disk = 0
        self.errors = 0  # writes the disk refused, both writer threads (under _lock)
        self.buffered = 0  # rows the writer holds, refused by the database (SQLite thread)
        # The watchdog's view (sorting/liveness.py), SQLite thread: turns of its loop, rows in a commit.
        self._turns = 0
        self._committing = 0
        self.stalled_since: float | None = None  # monotonic s of the first refusal in a streak (SQLite thread)
        self._submitted = dict.fromkeys(RECORD_KINDS[:2], 0)  # loop thread
        self._settled = dict.fromkeys(RECORD_KINDS[:2], 0)  # written, spilled or lost (SQLite thread)
        self._lost = dict.fromkeys(LOST_KINDS, 0)  # any thread, under _lock
        self._lock = threading.Lock()
        # Failures logged and not yet over ("spill", "decisions", "images:<dir>"...): the two
        # writer threads add and discard their own keys (single set operations, atomic).
        self._failing: set[str] = set()
        self._logged_at: dict[str, float] = {}  # key -> monotonic s of its last failure line (same owners)
        self._overflow_logged_at = float("-inf")  # loop thread
        self._closing = threading.Event()
        self._deadline = float("inf")  # set once by close: writers give up what is left after it
        self._open_error: BaseException | None = None
        self._ready = threading.Event()
        self._db_thread = threading.Thread(target=self._db_main, name="sorterd-sqlite", daemon=True)
        self._img_thread = threading.Thread(target=self._img_main, name="sorterd-images", daemon=True)
        self._db_thread.start()
        if not self._ready.wait(10.0):
            raise RecordError(f"{self.db_path}: the database did not open within 10 s (a hung disk?)")
        if self._open_error is not None:
            raise RecordError(f"cannot open the batch database {self.db_path}: {self._open_error}")
        self._img_thread.start()

    # -- loop side ----------------------------------------------------------

    def submit(self, row: StoneRow | UnseenRow) -> bool:
        try:
            self._rows.put_nowait(row)
        except queue.Full:
            self.rows_overflow += 1
            self._lose(_kind(row), 1)
            if time.monotonic() - self._overflow_logged_at >= LOG_EVERY_S:
                self._overflow_logged_at = time.monotonic()
                what = row.stone_id if isinstance(row, StoneRow) else f"unseen stone at {row.trigger_ns}"
                log.error("record queue full: row %s not logged (writer stalled?); %d rows lost to a full queue "
                          "so far (counted: sorterd_record_lost_total; logged at most every %.0f s)",
                          what, self.rows_overflow, LOG_EVERY_S)
            return False
        self._submitted[_kind(row)] += 1
        return True

    def submit_images(self, job: ImageJob) -> None:
        try:
            self._images.put_nowait(job)
        except queue.Full:
            self.images_overflow += 1
            self._lose_images(job)

    @property
    def depth(self) -> int:
        return self._rows.qsize()

    @property
    def name(self) -> str:
        return "record"

    def beat(self) -> Beat:
        """The writer thread's liveness: rows queued or in a commit, and the turns of its loop.  A
        disk that refuses writes is not stuck (the writer keeps turning: retry, spill, count lost);
        a write that never returns is."""
        return Beat(self.depth + self._committing, self._turns)

    @property
    def stalled(self) -> bool:
        """The database refuses writes right now (disk full or failing)."""
        return self.stalled_since is not None

    def lost_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._lost)

    def records_lost(self) -> int:
        """Stone records (rows, unseen rows, decision lines) neither in the database nor spilled."""
        lost = self.lost_counts()
        return sum(lost[k] for k in RECORD_KINDS)

    def summary(self) -> dict[str, Any]:
        """The run summary's `record` section."""
        return {"rows_written": self.rows_written, "unseen_written": self.unseen_written,
                "rows_overflow": self.rows_overflow, "images_overflow": self.images_overflow,
                "errors": self.errors, "rows_spilled": self.rows_spilled,
                "images_low_disk": self.images_low_disk, "lost": self.lost_counts()}

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the writers, within `timeout` (default close_timeout_s) whatever the disk does."""
        limit = self.close_timeout_s if timeout is None else timeout
        start = time.monotonic()
        self._deadline = start + limit
        self._closing.set()
        for q in (self._rows, self._images):
            with contextlib.suppress(queue.Full):  # a full queue: the writer sees _closing instead
                q.put_nowait(None)
        self._db_thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
        self._img_thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
        if self._db_thread.is_alive():
            self._abandon_rows(time.monotonic() - start)
        lost = self.lost_counts()
        if any(lost.values()):
            log.error("record: not kept in batch %s: %s (see the run summary's record section)", self.dir,
                      ", ".join(f"{k} {n}" for k, n in lost.items() if n))

    def _abandon_rows(self, waited_s: float) -> None:
        """The SQLite thread is stuck inside the disk: whatever it has not settled is lost."""
        with self._lock:
            missing = {k: self._submitted[k] - self._settled[k] for k in self._submitted}
            for k, n in missing.items():
                self._lost[k] += n
                self._settled[k] += n
        log.error("record: the database writer did not finish within %.1f s (stuck in the disk?): "
                  "%d rows and %d unseen rows counted as lost", waited_s, missing["rows"], missing["unseen"])

    # -- accounting (any thread) --------------------------------------------

    def _lose(self, what: str, n: int, settled: bool = False) -> None:
        with self._lock:
            self._lost[what] += n
            if settled:
                self._settled[what] += n

    def _lose_images(self, job: ImageJob) -> None:
        for kind, _, _ in self._image_writes(job):
            self._lose(kind, 1)

    def _count_error(self) -> None:
        with self._lock:  # both writer threads count here
            self.errors += 1

    def _settle(self, what: str, n: int) -> None:
        with self._lock:
            self._settled[what] += n

    # -- SQLite thread ------------------------------------------------------

    def _db_main(self) -> None:
        try:
            conn = self._connect(self.db_path)
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._write_loop(conn)
            self._write_decisions([], final=True)  # the lines still held for id order
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        pending: list[StoneRow | UnseenRow] = []
        due = time.monotonic() + self.commit_interval_s
        ending = False
        while not ending:
            ending = self._take(pending, due)
            now = time.monotonic()
            if pending and (ending or now >= due or (len(pending) >= self._batch and not self.stalled)):
                self._committing = len(pending)
                if self._commit(conn, pending):
                    pending = []
                self._committing = 0
                self._turns += 1
                due = now + (RETRY_S if self.stalled else self.commit_interval_s)
            elif now >= due:
                due = now + self.commit_interval_s
            self.buffered = len(pending)
        for row in pending:  # the last commit was refused too: nothing more to wait for
            self._shed(row)
        self.buffered = 0

    def _take(self, pending: list[StoneRow | UnseenRow], due: float) -> bool:
        """Move rows from the queue into `pending` until `due` or a full batch; True at the end of input."""
        while time.monotonic() < due or self._closing.is_set():
            self._turns += 1
            if time.monotonic() > self._deadline:
                self._drop_queued()
                return True
            try:
                item = self._rows.get(timeout=max(0.0, min(_POLL_S, due - time.monotonic())))
            except queue.Empty:
                if self._closing.is_set():
                    return True
                continue
            if item is None:
                return True
            if len(pending) >= self.buffer_size:
                self._shed(item)  # the buffer is full (the database refuses writes)
            else:
                pending.append(item)
                if len(pending) >= self._batch and not self.stalled:
                    return False
        return False

    def _drop_queued(self) -> None:
        """The stop's deadline has passed: what is still queued is lost."""
        while True:
            try:
                item = self._rows.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._lose(_kind(item), 1, settled=True)

    def _commit(self, conn: sqlite3.Connection, items: list[StoneRow | UnseenRow]) -> bool:
        """One transaction; False if the database refused it (the rows stay pending)."""
        rows = [r for r in items if isinstance(r, StoneRow)]
        unseen = [u for u in items if isinstance(u, UnseenRow)]
        try:
            with conn:
                conn.executemany(INSERT_SQL, [tuple(asdict(r).values()) for r in rows])
                conn.executemany(INSERT_UNSEEN_SQL, [tuple(asdict(u).values()) for u in unseen])
        except sqlite3.Error as exc:
            self._refused(exc, len(items))
            return False
        self.rows_written += len(rows)
        self.unseen_written += len(unseen)
        self._settle("rows", len(rows))
        self._settle("unseen", len(unseen))
        if self.stalled_since is not None:
            log.warning("record: the database takes rows again after %.1f s (%d buffered rows written)",
                        time.monotonic() - self.stalled_since, len(items))
            self.stalled_since = None
        self._write_decisions(rows)
        return True

    def _refused(self, exc: sqlite3.Error, n: int) -> None:
        self._count_error()
        if self.stalled_since is not None:
            log.debug("record: SQLite write of %d rows refused again: %s", n, exc)
            return
        self.stalled_since = time.monotonic()
        log.error("record: SQLite write of %d rows failed (%s): rows are kept (up to %d) and retried every "
                  "%.1f s; beyond that they go to %s, or are lost if that fails too (counted: "
                  "sorterd_record_lost_total)", n, exc, self.buffer_size, RETRY_S, self.dir / "stones.spill.jsonl")

    def _shed(self, row: StoneRow | UnseenRow) -> None:
        """A row the database cannot take now and the buffer cannot hold: spill it, or count it lost."""
        if self._spill([row]):
            self.rows_spilled += 1
            self._settle(_kind(row), 1)
        else:
            self._lose(_kind(row), 1, settled=True)

    def _write_decisions(self, rows: list[StoneRow], final: bool = False) -> None:
        """`run --decisions PATH`: the rows' lines, through the id-ordered `DecisionsFile`;
        lines the disk refuses are counted lost (SQLite thread only)."""
        if self.decisions is None or not (rows or final):
            return
        lost, exc = self.decisions.close() if final else self.decisions.add(rows)
        if exc is not None:
            self._lose("decisions", lost)
            self._streak("decisions", False, f"cannot write {self.decisions.path} ({exc}): decision lines are lost")
        else:
            self._streak("decisions", True, f"{self.decisions.path} is written again")

    def _spill(self, items: list[StoneRow | UnseenRow]) -> bool:
        """Last resort when SQLite fails (disk full, corruption): rows as JSON lines
        (an unseen stone's line has `"table": "unseen"`).  False if that failed too."""
        try:
            with open(self.dir / "stones.spill.jsonl", "a") as fh:
                for r in items:
                    line = asdict(r) if isinstance(r, StoneRow) else {"table": "unseen", **asdict(r)}
                    fh.write(json.dumps(line) + "\n")
        except OSError as exc:
            self._streak("spill", False, f"cannot write the spill file ({exc}): rows the database "
                         "refuses and the buffer cannot hold are lost")
            return False
        self._streak("spill", True, "the spill file is written again")
        return True

    def _streak(self, key: str, ok: bool, message: str) -> None:
        """Log a failure when it starts and when it ends, never once per stone; one that
        comes and goes is logged at most every LOG_EVERY_S."""
        if ok and key in self._failing:
            self._failing.discard(key)
            log.warning("record: %s", message)
        elif not ok and key not in self._failing:
            now = time.monotonic()
            if now - self._logged_at.get(key, float("-inf")) >= LOG_EVERY_S:
                self._logged_at[key] = now
                self._failing.add(key)
                log.error("record: %s (counted: sorterd_record_lost_total)", message)

    # -- image thread -------------------------------------------------------

    def _img_main(self) -> None:
        while (job := self._next_image()) is not None:
            if time.monotonic() > self._deadline:
                self._lose_images(job)  # the stop came first
                continue
            self._write_images(job)

    def _next_image(self) -> ImageJob | None:
        while True:
            try:
                return self._images.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closing.is_set():
                    return None

    def _write_images(self, job: ImageJob) -> None:
        for kind, folder, write in self._image_writes(job):
            if self._low_disk(folder):
                self.images_low_disk += 1
                self._lose(kind, 1)
                continue
            try:
                write()
            except (OSError, cv2.error) as exc:
                self._count_error()
                self._lose(kind, 1)
                self._streak(f"images:{folder}", False, f"cannot write images in {folder} ({exc}): "
                             f"images are dropped until writes work again")
            else:
                self._streak(f"images:{folder}", True, f"images in {folder} are written again")

    def _image_writes(self, job: ImageJob) -> list[tuple[str, Path, Callable[[], None]]]:
        sid = job.stone_id
        writes: list[tuple[str, Path, Callable[[], None]]] = []
        if job.thumbnail is not None:
            thumb = job.thumbnail
            writes.append(("thumbnails", self.dir, lambda: self._write_thumbnail(sid, thumb)))
        if job.full:
            full = job.full
            writes.append(("flagged_images", self.dir, lambda: self._write_flagged(sid, full)))
        if job.raw is not None and self.session is not None:
            session, raw = self.session, job.raw
            writes.append(("pairs", session.dir, lambda: session.write_pair(sid, *raw)))
        return writes

    def _low_disk(self, folder: Path) -> bool:
        """Below record.min_free_mb free, images yield their room to rows (logged when it starts and ends)."""
        if self.min_free_bytes <= 0:
            return False
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return False  # the write itself will say what is wrong
        low = free < self.min_free_bytes
        self._streak(f"low:{folder}", not low, f"{folder}: {free / 1e6:.1f} MB free, below record.min_free_mb "
                     f"({self.min_free_bytes / 1e6:.0f} MB): images are skipped so rows keep their room"
                     if low else f"{folder}: {free / 1e6:.1f} MB free again: images are written")
        return low

    def _write_thumbnail(self, sid: str, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        thumb = cv2.resize(image, (max(1, w * self.thumbnail_px // h), self.thumbnail_px), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"could not encode the thumbnail of {sid}")
        path = self.dir / "thumbnails" / f"{sid}.jpg"
        try:
            path.write_bytes(buf.tobytes())  # an OSError (disk full) says so, unlike cv2.imwrite
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()  # no half thumbnail
            raise

    def _write_flagged(self, sid: str, full: dict[str, np.ndarray]) -> None:
        for mode, image in full.items():
            write_png_atomic(self.dir / "flagged" / f"{sid}_{mode}.png", image)  # the outbox reads these


class DecisionsFile:
    """`run --decisions PATH`: one JSON line per stone (exact floats), in stone id order
    (`stone_order`), so a live run and its replay compare with a plain `diff`.

    Rows finish in completion order (a stone with a pulse waits for its outcome),
    never far from id order: lines wait in a heap of at most `hold` and leave
    smallest id first; the rest leave at close.  A row finishing more than `hold`
    rows late would break the order: counted in `out_of_order` and logged.
    SQLite thread only."""

    def __init__(self, path: Path, hold: int = 4096) -> None:
        self.path = path
        self.hold = hold
        self.out_of_order = 0
        self._heap: list[tuple[tuple[int, int, str], str]] = []
        self._last: tuple[int, int, str] | None = None

    def add(self, rows: list[StoneRow]) -> tuple[int, OSError | None]:
        """Hold the rows' lines; write those beyond `hold`.  (lines lost, the error) if the disk refused."""
        for r in rows:
            heapq.heappush(self._heap, (stone_order(r.stone_id), json.dumps(decision_record(r))))
        return self._write(len(self._heap) - self.hold)

    def close(self) -> tuple[int, OSError | None]:
        return self._write(len(self._heap))

    def _write(self, n: int) -> tuple[int, OSError | None]:
        if n <= 0:
            return 0, None
        lines = []
        for _ in range(n):
            key, line = heapq.heappop(self._heap)
            if self._last is not None and key < self._last:
                self.out_of_order += 1
                log.warning("%s: a row finished more than %d rows late is out of order", self.path, self.hold)
            self._last = key
            lines.append(line + "\n")
        try:
            with open(self.path, "a") as fh:
                fh.writelines(lines)
        except OSError as exc:
            return n, exc
        return 0, None


def decision_record(r: StoneRow) -> dict[str, Any]:
    return {
        "stone_id": r.stone_id, "bin": r.bin, "route": r.route,
        "color": r.color, "clarity": r.clarity,
        "p_color": {"blue": r.p_blue, "light": r.p_light, "inky": r.p_inky},
        "p_clarity": {"transparent": r.p_transparent, "translucent": r.p_translucent, "opaque": r.p_opaque},
        "confidence": r.confidence, "flagged": bool(r.flagged), "size_mm": r.size_mm,
        "cluster": bool(r.cluster), "reason": r.reason,
    }


def wall_time_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


def read_unseen(db_path: Path) -> list[dict[str, Any]]:
    """The batch's unseen stones (schema 3; an older database has none recorded)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'unseen'").fetchone():
            return []
        return [dict(r) for r in conn.execute("SELECT * FROM unseen ORDER BY trigger_ns")]
    finally:
        conn.close()


def read_rows(db_path: Path) -> list[dict[str, Any]]:
    """All rows of a batch database (read-only), e.g. for summaries and tests."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM stones ORDER BY stone_id")]
    finally:
        conn.close()
