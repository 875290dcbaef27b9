"""The production log of a batch (§7.1): SQLite rows, thumbnails, flagged images.

One thread owns the SQLite connection; the event loop only puts finished
rows on a bounded queue (never blocks).  Rows are committed in small batches
(WAL, synchronous=NORMAL): a SIGKILL loses at most the rows of the last
commit interval, and the database always opens clean because every row is
one INSERT inside a transaction.  Images are encoded by a second thread so
a slow disk never delays a commit.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from sorterd.data.files import write_png_atomic
from sorterd.data.session import PairTimes, SessionWriter

if TYPE_CHECKING:  # the row's sources; only their fields are read here
    from sorterd.controller.outputs import Pulse
    from sorterd.parts.camera import FramePair
    from sorterd.parts.inference.onnxruntime import Prediction
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


def open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=True)
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


class Recorder:
    """Owns the batch folder; `submit` and `submit_images` are called from the loop."""

    def __init__(self, batch_dir: Path, commit_interval_s: float, queue_size: int, thumbnail_px: int = 96,
                 session: SessionWriter | None = None, decisions: Path | None = None) -> None:
        self.thumbnail_px = thumbnail_px
        self.session = session  # written by the image thread only
        self.decisions_path = decisions  # written by the SQLite thread only
        self.dir = batch_dir
        self.db_path = batch_dir / "stones.db"
        self.commit_interval_s = commit_interval_s
        self._rows: queue.Queue[StoneRow | UnseenRow | None] = queue.Queue(maxsize=queue_size)
        self._images: queue.Queue[ImageJob | None] = queue.Queue(maxsize=256)
        # Counters: written by the loop thread (overflow) or the writer threads
        # (written, errors); read by anyone for metrics.
        self.rows_overflow = 0
        self.images_overflow = 0
        self.rows_written = 0
        self.unseen_written = 0
        self.errors = 0
        self._ready = threading.Event()
        self._db_thread = threading.Thread(target=self._db_main, name="sorterd-sqlite", daemon=True)
        self._img_thread = threading.Thread(target=self._img_main, name="sorterd-images", daemon=True)
        self._db_thread.start()
        self._img_thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError(f"cannot open {self.db_path}")

    # -- loop side ----------------------------------------------------------

    def submit(self, row: StoneRow | UnseenRow) -> bool:
        try:
            self._rows.put_nowait(row)
            return True
        except queue.Full:
            self.rows_overflow += 1
            what = row.stone_id if isinstance(row, StoneRow) else f"unseen stone at {row.trigger_ns}"
            log.error("record queue full: row %s not logged (writer stalled?)", what)
            return False

    def submit_images(self, job: ImageJob) -> None:
        try:
            self._images.put_nowait(job)
        except queue.Full:
            self.images_overflow += 1

    @property
    def depth(self) -> int:
        return self._rows.qsize()

    def close(self, timeout: float = 30.0) -> None:
        self._rows.put(None)
        self._images.put(None)
        self._db_thread.join(timeout)
        self._img_thread.join(timeout)

    # -- writer threads -----------------------------------------------------

    def _db_main(self) -> None:
        conn = open_db(self.db_path)
        self._ready.set()
        pending: list[StoneRow | UnseenRow] = []
        deadline = time.monotonic() + self.commit_interval_s
        running = True
        while running:
            try:
                item = self._rows.get(timeout=max(0.0, deadline - time.monotonic()))
                if item is None:
                    running = False
                else:
                    pending.append(item)
            except queue.Empty:
                pass
            if pending and (not running or len(pending) >= 256 or time.monotonic() >= deadline):
                self._commit(conn, pending)
                pending = []
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self.commit_interval_s
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def _commit(self, conn: sqlite3.Connection, items: list[StoneRow | UnseenRow]) -> None:
        rows = [r for r in items if isinstance(r, StoneRow)]
        unseen = [u for u in items if isinstance(u, UnseenRow)]
        try:
            with conn:
                conn.executemany(INSERT_SQL, [tuple(asdict(r).values()) for r in rows])
                conn.executemany(INSERT_UNSEEN_SQL, [tuple(asdict(u).values()) for u in unseen])
            self.rows_written += len(rows)
            self.unseen_written += len(unseen)
            self._write_decisions(rows)
        except sqlite3.Error:
            self.errors += 1
            log.exception("SQLite write of %d rows failed; rows kept in the spill file", len(items))
            self._spill(items)

    def _write_decisions(self, rows: list[StoneRow]) -> None:
        """`run --decisions PATH`: one JSON line per stone, exact floats."""
        if self.decisions_path is None:
            return
        with open(self.decisions_path, "a") as fh:
            for r in rows:
                fh.write(json.dumps(decision_record(r)) + "\n")

    def _spill(self, items: list[StoneRow | UnseenRow]) -> None:
        """Last resort when SQLite fails (disk full, corruption): rows as JSON lines
        (an unseen stone's line has `"table": "unseen"`)."""
        with open(self.dir / "stones.spill.jsonl", "a") as fh:
            for r in items:
                line = asdict(r) if isinstance(r, StoneRow) else {"table": "unseen", **asdict(r)}
                fh.write(json.dumps(line) + "\n")

    def _img_main(self) -> None:
        while (job := self._images.get()) is not None:
            try:
                self._write_images(job)
            except (OSError, cv2.error):
                self.errors += 1
                log.exception("could not write images of %s", job.stone_id)

    def _write_images(self, job: ImageJob) -> None:
        if job.thumbnail is not None:
            h, w = job.thumbnail.shape[:2]
            thumb = cv2.resize(job.thumbnail, (max(1, w * self.thumbnail_px // h), self.thumbnail_px),
                               interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(self.dir / "thumbnails" / f"{job.stone_id}.jpg"), thumb,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
        for mode, image in (job.full or {}).items():
            write_png_atomic(self.dir / "flagged" / f"{job.stone_id}_{mode}.png", image)  # the outbox reads these
        if job.raw is not None and self.session is not None:
            self.session.write_pair(job.stone_id, *job.raw)


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
