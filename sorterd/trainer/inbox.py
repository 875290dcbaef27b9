"""The trainer's inbox: records from the sorters (§5.1) written into a §7.1 dataset.

    DIR/images/processed/{backlit,toplit}/<id>.png      the crops the model saw (stone record)
    DIR/images/processed/processed_meta.json            {"crop_mm": ...}, from the first stone
    DIR/images/raw/<session>/{backlit,toplit}/<id>.png  the stone's whole frame pair
    DIR/images/raw/<session>/reference/{backlit,toplit}.png, session_meta.json   (session record)
    DIR/labels.jsonl                                    §3.4; created empty, the review page appends
    DIR/unlabelled.jsonl                                the review queue: one line per stored stone
    DIR/inbox/sorters.json                              per-sorter state (`sorterd trainer status`)

Ids.  Every sorter numbers its stones S000001... in every batch (§7.2), and every sorter has a
session 2026-02-15_001, so the dataset names them after the whole key:

* stone ``<sorter>.<batch>.<stone>`` (``press2.2026-03-01_morning.S000001``) when the sorter and
  batch ids hold no '.' and the whole is at most 128 characters; this reads back unambiguously
  (split at the first two dots: a stone id may hold dots, S000011.1);
* session ``<sorter>.<session>`` under the same rule;
* otherwise ``<sorter, dots as '_', first 40 chars>-<first 32 hex of sha256 of the JSON key>``:
  no dot, so it never equals a name of the first form.

Both are file-name-safe (`sorterd.data.dataset` stone ids) and deterministic: the same record
gets the same name on every trainer.  ``session_meta.json`` holds the dataset session name as
its ``session_id`` (a dataset's session ids are unique, `read_sessions`), and the sorter's own
ids under ``"inbox": {"sorter_id", "batch", "session_id"}`` (extra fields the strict reader keeps
out).  A stone whose session record has not arrived yet is stored all the same; its session
folder then has frames and no meta until the session record comes.

The queue line (UTF-8 JSON, one per line, appended in arrival order):

    stone_id          the dataset id (the name of the crops; what a labels.jsonl line uses)
    sorter_id, batch, sorter_stone_id     the record's key as the sorter sent it
    session_id        the dataset session (folder under images/raw, labels' session_id)
    sorter_session_id the sorter's session id;  lot_id
    wall_time         when the sorter decided (its ISO 8601);  received: when stored here (UTC)
    model_version, p_color [blue, light, inky], p_clarity [transparent, translucent, opaque]
    predicted         the top colour_clarity class;  decision, route (bins), confidence (§5.2)
    size_mm, pixels_per_mm, crop_mm, reason ("flagged" | "drift")
    uncertainty       §5.3 score, computed here from the probabilities (`domain.uncertainty_score`)
    boosts            the §5.3 signals that apply: "cut_flip_boundary" (the two likeliest classes
                      go to CUT and FLIP: HIGH), "rare_class" (inky_transparent predicted:
                      MEDIUM), "near_threshold" (confidence in [0.75, 0.80): LOW)
    priority          uncertainty + 1.0 HIGH + 0.5 MEDIUM + 0.1 LOW: review highest first
                      ("model disagrees with an existing label" needs a label: not applied here)
    images            {name: sha256 hex} of the four PNGs as stored

Durability (DESIGN §4a, the Titanic pattern: disk before ack).  `store` returns "stored" only
after every file of the record is written to a temp file, fsynced, renamed into place, its
directories fsynced, and -- last -- the queue line appended and fsynced (a session record's
last step is its session_meta.json).  The queue line (the meta) is the commit: a stone without
one is invisible, and the files it left are removed at the next open, with any temp files.
A torn last line (the trainer killed mid-append) is cut off at open, logged; the record is
then not acknowledged and the sorter sends it again.  The same key stored again answers
"duplicate" and writes nothing; the key set is rebuilt from the queue and the session metas at
open, so this holds across restarts.  A disk error (ENOSPC, EACCES, EROFS, ...) answers
"unavailable" and removes what this store had written; the next store tries again.

Not thread-safe by design beyond one lock: the link server calls `store` and `sorter_seen` from
one worker thread, never from the event loop (every call does file I/O).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.data.dataset import LABELS_FILE, PROCESSED_META, read_labels
from sorterd.data.files import write_json_atomic
from sorterd.data.session import SessionError, SessionMeta
from sorterd.domain import BINS, CLARITIES, COLORS, DEFAULT_BINS, LIGHT_MODES, uncertainty_score
from sorterd.link.records import SESSION_IMAGES, STONE_IMAGES, Record, SessionRecord, StoneRecord, Stored
from sorterd.trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)

QUEUE_FILE = "unlabelled.jsonl"
STATE_DIR = "inbox"
SORTERS_FILE = "sorters.json"
CONNECTED_S = 10.0  # a sorter is shown connected while seen within this (heartbeats come every ~1 s)
SAVE_EVERY_S = 1.0  # sorters.json is rewritten at most this often (and at close)
MAX_ID = 128  # sorterd.data.dataset's file-name-safe ids
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a sorter, batch, stone or session id
_HASHED = re.compile(r"-[0-9a-f]{32}$")
CROP_PX = (16, 2048)  # plausible side of a crop, pixels
FRAME_PX = (32, 8192)  # plausible side of a whole frame
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk: a PNG cut short lacks it
HIGH, MEDIUM, LOW = 1.0, 0.5, 0.1  # §5.3 priority boosts
NEAR_THRESHOLD = (0.75, 0.80)
RARE_CLASSES = frozenset({"inky_transparent"})  # §1.3: the one rare combination
CROP_MM_TOLERANCE = 1e-6


class InboxError(RuntimeError):
    """An inbox folder that cannot be opened (names the file and what is wrong)."""


class _Refusal(Exception):
    """A record that will never be accepted: `category` is the metric label, the message the reason."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


# -- names -----------------------------------------------------------------------------


def _joined(parts: tuple[str, ...]) -> str | None:
    """'a.b.c' when every part but the last is dot-free and the whole fits, else None."""
    if any("." in p for p in parts[:-1]):
        return None
    name = ".".join(parts)
    return name if len(name) <= MAX_ID else None


def _hashed(parts: tuple[str, ...]) -> str:
    digest = hashlib.sha256(json.dumps(list(parts)).encode("utf-8")).hexdigest()[:32]
    return f"{parts[0].replace('.', '_')[:40]}-{digest}"


def dataset_stone_id(sorter_id: str, batch: str, stone_id: str) -> str:
    """The dataset's name of a sorter's stone (module docstring: Ids)."""
    parts = (sorter_id, batch, stone_id)
    return _joined(parts) or _hashed(parts)


def dataset_session(sorter_id: str, session_id: str) -> str:
    """The dataset's name (folder under images/raw) of a sorter's capture session."""
    parts = (sorter_id, session_id)
    return _joined(parts) or _hashed(parts)


def is_inbox_name(name: str) -> bool:
    """A name `dataset_stone_id` could have made (orphan clean-up touches nothing else)."""
    if _HASHED.search(name):
        return True
    parts = name.split(".", 2)
    return len(parts) == 3 and all(_PART.match(p) for p in parts)


# -- the disk --------------------------------------------------------------------------


class Disk:
    """The file operations of the inbox, each durable; a test substitutes one that fails like a full disk."""

    def write(self, path: Path, data: bytes) -> None:
        """data to a temp file beside path, fsynced, renamed over path; the temp never survives a failure."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: Path) -> None:
        """path and its missing parents; each new directory's parent is fsynced (the entry is durable)."""
        missing: list[Path] = []
        p = path
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            self.fsync_dir(d.parent)

    def append(self, path: Path, data: bytes) -> None:
        """data appended to path and fsynced; on any failure the file is cut back to its old length."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
        finally:
            os.close(fd)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)


# -- per-sorter state ------------------------------------------------------------------


@dataclass
class SorterState:
    """What the trainer knows of one sorter (persisted in DIR/inbox/sorters.json)."""

    sorter_id: str
    last_seen: float | None = None  # unix time of its last heartbeat or record
    connected: bool = False  # last seen within the inbox's connected_s (as of sorters())
    stones_received: int = 0  # stones in the dataset from it (counted from the queue at open)
    sessions_received: int = 0
    duplicates: int = 0
    refused: int = 0
    outbox_entries: int = 0  # its outbox depth as it last reported
    outbox_bytes: int = 0


_PERSISTED = ("last_seen", "duplicates", "refused", "outbox_entries", "outbox_bytes")


# -- the inbox -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """Where a stored record lives."""

    stone_id: str
    session: str


class Inbox:
    """The trainer's `InboxSink` (sorterd.link.records); open it with `open_inbox`."""

    def __init__(self, root: Path, disk: Disk, clock: Callable[[], float], connected_s: float,
                 metrics: TrainerMetrics) -> None:
        self.root = root
        self.disk = disk
        self.clock = clock  # unix time (last_seen, received)
        self.connected_s = connected_s
        self.metrics = metrics
        self.queue_path = root / QUEUE_FILE
        self.state_path = root / STATE_DIR / SORTERS_FILE
        self._lock = threading.Lock()  # store / sorter_seen (the server's worker thread) vs sorters() (scrapes)
        self._keys: set[tuple[str, str, str]] = set()  # every stored record's key (stones and sessions)
        self._ids: set[str] = set()  # every stored stone's dataset id
        self._crop_mm: float | None = None
        self._states: dict[str, SorterState] = {}
        self._saved_at = -math.inf

    # -- InboxSink ---------------------------------------------------------------------

    def store(self, sorter_id: str, record: Record) -> Stored:
        """Write the record durably, or say why not (module docstring: Durability)."""
        with self._lock:
            state = self._state(sorter_id)
            state.last_seen = self.clock()
            try:
                result = self._store(sorter_id, record, state)
            except _Refusal as exc:
                state.refused += 1
                self.metrics.refused.labels(sorter_id, exc.category).inc()
                log.warning("refused %s from %s: %s", record.key, sorter_id, exc)
                result = Stored("refused", str(exc))
            self._save_state(force=False)
            return result

    def sorter_seen(self, sorter_id: str, outbox_entries: int, outbox_bytes: int) -> None:
        with self._lock:
            state = self._state(sorter_id)
            state.last_seen = self.clock()
            state.outbox_entries, state.outbox_bytes = int(outbox_entries), int(outbox_bytes)
            self._save_state(force=False)

    # -- what the trainer shows ----------------------------------------------------------

    def sorters(self) -> dict[str, SorterState]:
        """A copy of every known sorter's state, `connected` as of now."""
        with self._lock:
            now = self.clock()
            out = {}
            for sid, st in self._states.items():
                copy = SorterState(**asdict(st))
                copy.connected = st.last_seen is not None and now - st.last_seen <= self.connected_s
                out[sid] = copy
            return out

    def close(self) -> None:
        with self._lock:
            self._save_state(force=True)

    # -- storing -------------------------------------------------------------------------

    def _store(self, sorter_id: str, record: Record, state: SorterState) -> Stored:
        if record.sorter_id != sorter_id:
            raise _Refusal("sorter_mismatch", f"record names sorter {record.sorter_id!r}, but it came from "
                                              f"{sorter_id!r} (a sorter sends only its own records)")
        for what, value in zip(("sorter_id", "batch"), record.key[:2], strict=True):
            _check_part(what, value)
        if record.key in self._keys:
            state.duplicates += 1
            self.metrics.duplicates.labels(sorter_id).inc()
            return Stored("duplicate")
        try:
            if isinstance(record, StoneRecord):
                self._store_stone(record)
                state.stones_received += 1
            else:
                if self._store_session(record):
                    state.duplicates += 1
                    self.metrics.duplicates.labels(sorter_id).inc()
                    return Stored("duplicate")
                state.sessions_received += 1
        except OSError as exc:
            self.metrics.unavailable.inc()
            reason = _disk_reason(exc)
            log.error("cannot store %s from %s: %s", record.key, sorter_id, reason)
            return Stored("unavailable", reason)
        self._keys.add(record.key)
        self.metrics.received.labels(sorter_id).inc()
        return Stored("stored")

    def _store_stone(self, rec: StoneRecord) -> None:
        _check_part("stone_id", rec.stone_id)
        _check_part("session_id", rec.session_id)
        _check_stone_fields(rec)
        if self._crop_mm is not None and abs(rec.crop_mm - self._crop_mm) > CROP_MM_TOLERANCE:
            raise _Refusal("crop_mm", f"crop_mm = {rec.crop_mm}: this dataset's crops cover {self._crop_mm} mm "
                                      "(one crop size per dataset; set the sorter's crop to match)")
        shapes = _check_images(rec.images, STONE_IMAGES)
        _check_pair(shapes, "backlit_crop", "toplit_crop", CROP_PX)
        _check_pair(shapes, "backlit_full", "toplit_full", FRAME_PX)
        sid = dataset_stone_id(*rec.key)
        session = dataset_session(rec.sorter_id, rec.session_id)
        processed = self.root / "images" / "processed"
        raw = self.root / "images" / "raw" / session
        files = {processed / "backlit" / f"{sid}.png": rec.images["backlit_crop"],
                 processed / "toplit" / f"{sid}.png": rec.images["toplit_crop"],
                 raw / "backlit" / f"{sid}.png": rec.images["backlit_full"],
                 raw / "toplit" / f"{sid}.png": rec.images["toplit_full"]}
        line = json.dumps(_queue_line(rec, sid, session, self.clock()), allow_nan=False) + "\n"
        written: list[Path] = []
        try:
            if self._crop_mm is None:
                self._write_crop_mm(processed, rec.crop_mm)
            self._write_all(files, written)
            self.disk.append(self.queue_path, line.encode("utf-8"))
        except BaseException:
            self._undo(written)
            raise
        self._ids.add(sid)

    def _store_session(self, rec: SessionRecord) -> bool:
        """Write a session's references then its meta (the commit); True if it was already kept."""
        _check_part("session_id", rec.session_id)
        session = dataset_session(rec.sorter_id, rec.session_id)
        folder = self.root / "images" / "raw" / session
        meta_path = folder / "session_meta.json"
        if meta_path.is_file():  # the same session sent again (in another batch): kept once
            return True
        meta = _session_meta(rec, session)
        shapes = _check_images(rec.images, SESSION_IMAGES)
        _check_pair(shapes, "reference_backlit", "reference_toplit", FRAME_PX)
        files = {folder / "reference" / f"{mode}.png": rec.images[f"reference_{mode}"] for mode in LIGHT_MODES}
        written: list[Path] = []
        try:
            self._write_all(files, written)
            self.disk.write(meta_path, meta)
            self.disk.fsync_dir(folder)
        except BaseException:
            self._undo([*written, meta_path])  # a meta renamed in but not fsynced is not committed either
            raise
        return False

    def _write_all(self, files: dict[Path, bytes], written: list[Path]) -> None:
        """Every file durably in place (each directory fsynced once); `written` lists what is there."""
        dirs = sorted({p.parent for p in files})
        for d in dirs:
            self.disk.makedirs(d)
        for path, data in files.items():
            self.disk.write(path, data)
            written.append(path)
        for d in dirs:
            self.disk.fsync_dir(d)

    def _write_crop_mm(self, processed: Path, crop_mm: float) -> None:
        self.disk.makedirs(processed)
        text = json.dumps({"crop_mm": crop_mm, "cut_by": "the sorter (sorterd.sorting.segment), via the link"},
                          indent=2) + "\n"
        self.disk.write(processed / PROCESSED_META, text.encode("utf-8"))
        self.disk.fsync_dir(processed)
        self._crop_mm = crop_mm

    def _undo(self, written: list[Path]) -> None:
        for path in written:
            try:
                self.disk.remove(path)
            except OSError as exc:  # removed at the next open (an uncommitted file)
                log.warning("could not remove %s after a failed store: %s", path, exc)

    # -- state ---------------------------------------------------------------------------

    def _state(self, sorter_id: str) -> SorterState:
        if sorter_id not in self._states:
            self._states[sorter_id] = SorterState(sorter_id)
        return self._states[sorter_id]

    def _save_state(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at = now
        data = {"schema": 1, "connected_s": self.connected_s, "written": self.clock(),
                "sorters": {sid: {k: getattr(st, k) for k in ("stones_received", "sessions_received", *_PERSISTED)}
                            for sid, st in sorted(self._states.items())}}
        try:
            write_json_atomic(self.state_path, data)
        except OSError as exc:  # shown state only: the dataset is what must not be lost
            log.warning("could not write %s: %s", self.state_path, exc)

    # -- opening -------------------------------------------------------------------------

    def _open(self) -> None:
        for d in (self.root, self.root / STATE_DIR):
            self.disk.makedirs(d)
        if not (self.root / LABELS_FILE).exists():  # an empty dataset is a dataset (open_dataset reads it)
            self.disk.write(self.root / LABELS_FILE, b"")
        if not self.queue_path.exists():
            self.disk.write(self.queue_path, b"")
        self.disk.fsync_dir(self.root)
        self._remove_temps()
        self._read_queue()
        self._read_sessions()
        self._read_crop_mm()
        self._load_state()
        self._remove_orphans()

    def _read_queue(self) -> None:
        data = self.queue_path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: cut off a torn last line (%d bytes, a store interrupted before its commit)",
                        self.queue_path, len(data) - end)
            with open(self.queue_path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                self._take_queue_line(line, lineno)

    def _take_queue_line(self, line: bytes, lineno: int) -> None:
        try:
            rec = json.loads(line)
            key = (rec["sorter_id"], rec["batch"], rec["sorter_stone_id"])
            sid = rec["stone_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InboxError(f"{self.queue_path}:{lineno}: not a queue line ({exc!r}); only the last line can be "
                             "torn by a crash, so this file was changed by hand: fix or remove that line") from None
        if key in self._keys:
            raise InboxError(f"{self.queue_path}:{lineno}: a second line for {key}; keep one line per stone")
        self._keys.add(key)
        self._ids.add(sid)
        self._state(key[0]).stones_received += 1

    def _read_sessions(self) -> None:
        raw = self.root / "images" / "raw"
        for path in sorted(raw.glob("*/session_meta.json")) if raw.is_dir() else []:
            try:
                mine = json.loads(path.read_bytes()).get("inbox")
            except (OSError, ValueError, AttributeError) as exc:
                raise InboxError(f"{path}: not readable JSON ({exc})") from None
            if isinstance(mine, dict):
                key = (str(mine.get("sorter_id")), str(mine.get("batch")), f"session:{mine.get('session_id')}")
                self._keys.add(key)
                self._state(key[0]).sessions_received += 1

    def _read_crop_mm(self) -> None:
        path = self.root / "images" / "processed" / PROCESSED_META
        if path.exists():
            try:
                self._crop_mm = float(json.loads(path.read_text())["crop_mm"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InboxError(f"{path}: needs {{\"crop_mm\": <mm>}} ({exc!r})") from None

    def _load_state(self) -> None:
        try:
            saved = json.loads(self.state_path.read_text())["sorters"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); per-sorter counts start again", self.state_path, exc)
            return
        for sid, fields in saved.items() if isinstance(saved, dict) else []:
            st = self._state(str(sid))
            for k in _PERSISTED:
                if isinstance(fields, dict) and isinstance(fields.get(k), (int, float)):
                    setattr(st, k, fields[k])

    def _remove_temps(self) -> None:
        for path in _candidate_dirs(self.root):
            for tmp in path.glob(".*.tmp"):
                log.info("removing %s (left by an interrupted write)", tmp)
                tmp.unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Stone files whose queue line never made it (killed mid-store): not committed, so not kept."""
        labelled = set()
        if (self.root / LABELS_FILE).is_file():
            try:
                labelled = {lab.stone_id for lab in read_labels(self.root / LABELS_FILE)}
            except ValueError as exc:  # the review page's file: its problems are `sorterd train`'s to report
                log.warning("%s: %s", self.root / LABELS_FILE, exc)
                return
        for folder in _frame_dirs(self.root):
            for png in folder.glob("*.png"):
                if is_inbox_name(png.stem) and png.stem not in self._ids and png.stem not in labelled:
                    log.warning("removing %s: its stone was never committed to %s", png, QUEUE_FILE)
                    png.unlink(missing_ok=True)


def open_inbox(root: Path, *, disk: Disk | None = None, clock: Callable[[], float] = time.time,
               connected_s: float = CONNECTED_S, metrics: TrainerMetrics | None = None) -> Inbox:
    """Open (creating) the inbox dataset at root: repair a torn queue tail, rebuild the key set,
    remove what an interrupted store left; raises InboxError for a folder it cannot use."""
    inbox = Inbox(Path(root), disk or Disk(), clock, connected_s, metrics or TrainerMetrics())
    try:
        inbox._open()
    except OSError as exc:
        raise InboxError(f"{root}: cannot open the inbox ({_disk_reason(exc)})") from None
    inbox.metrics.watch(lambda: {s: (st.connected, st.outbox_entries) for s, st in inbox.sorters().items()})
    return inbox


# -- checks ----------------------------------------------------------------------------


def _check_part(what: str, value: str) -> None:
    if not isinstance(value, str) or not _PART.match(value):
        raise _Refusal("bad_id", f"{what} {value!r} must be 1-64 letters, digits, '_', '-', '.' (starting with a "
                                 "letter or digit)")


def _probs(what: str, values: Iterable[float], names: tuple[str, ...]) -> None:
    p = list(values)
    ok = (len(p) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and 0.0 <= v <= 1.0 for v in p) and abs(sum(p) - 1.0) <= 0.02)
    if not ok:
        raise _Refusal("bad_field", f"{what} = {p!r} must be 3 probabilities ({', '.join(names)}) in 0..1 summing "
                                    "to 1")


def _number(what: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise _Refusal("bad_field", f"{what} = {value!r} must be a number in {lo}..{hi}")


def _check_stone_fields(rec: StoneRecord) -> None:
    _probs("p_color", rec.p_color, COLORS)
    _probs("p_clarity", rec.p_clarity, CLARITIES)
    _number("confidence", rec.confidence, 0.0, 1.0)
    _number("size_mm", rec.size_mm, 0.0, 100.0)
    _number("pixels_per_mm", rec.pixels_per_mm, 1.0, 1000.0)
    _number("crop_mm", rec.crop_mm, 0.01, 100.0)
    for what, value in (("decision", rec.decision), ("route", rec.route)):
        if value not in BINS:
            raise _Refusal("bad_field", f"{what} {value!r}: must be one of {', '.join(BINS)}")
    if rec.reason not in ("flagged", "drift"):
        raise _Refusal("bad_field", f"reason {rec.reason!r}: must be flagged or drift")
    for what, text in (("lot_id", rec.lot_id), ("wall_time", rec.wall_time), ("model_version", rec.model_version)):
        if not isinstance(text, str) or len(text) > 256:
            raise _Refusal("bad_field", f"{what} = {text!r} must be a string of at most 256 characters")


def _check_images(images: dict[str, bytes], names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Each named image a whole, decodable PNG; returns their shapes.  Refuses missing or extra images."""
    missing = [n for n in names if n not in images]
    extra = sorted(set(images) - set(names))
    if missing or extra:
        raise _Refusal("bad_image", f"images {sorted(images)}: needs exactly {', '.join(names)}"
                                    + (f" (missing {', '.join(missing)})" if missing else "")
                                    + (f" (unknown {', '.join(extra)})" if extra else ""))
    return {n: _png_shape(n, images[n]) for n in names}


def _png_shape(name: str, data: bytes) -> tuple[int, ...]:
    if not isinstance(data, bytes) or not data.startswith(PNG_SIGNATURE):
        raise _Refusal("bad_image", f"{name}: not a PNG (lossless PNG only, §2.1)")
    if not data.endswith(PNG_END):
        raise _Refusal("bad_image", f"{name}: truncated PNG ({len(data)} bytes, no IEND chunk at the end)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise _Refusal("bad_image", f"{name}: PNG cannot be decoded ({len(data)} bytes, corrupt)")
    if image.dtype not in (np.uint8, np.uint16) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise _Refusal("bad_image", f"{name}: {image.dtype} x {image.shape}: expected 8/16-bit gray, BGR or BGRA")
    return tuple(int(v) for v in image.shape)


def _check_pair(shapes: dict[str, tuple[int, ...]], a: str, b: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    for name in (a, b):
        h, w = shapes[name][:2]
        if not (lo <= h <= hi and lo <= w <= hi):
            raise _Refusal("bad_image", f"{name}: {w}x{h} pixels, implausible: each side must be {lo}..{hi}")
    if shapes[a][:2] != shapes[b][:2]:
        raise _Refusal("bad_image", f"{a} is {shapes[a][1]}x{shapes[a][0]} but {b} is {shapes[b][1]}x{shapes[b][0]}: "
                                    "a pair's two images have one size")


def _session_meta(rec: SessionRecord, session: str) -> bytes:
    """The session_meta.json to write: the sorter's meta, strictly checked, renamed to the dataset session."""
    given = rec.meta.get("session_id", rec.session_id)
    if given != rec.session_id:
        raise _Refusal("bad_session_meta", f"meta session_id {given!r} differs from the record's {rec.session_id!r}")
    meta: dict[str, Any] = {**rec.meta, "session_id": session,
                            "inbox": {"sorter_id": rec.sorter_id, "batch": rec.batch, "session_id": rec.session_id}}
    try:
        SessionMeta.from_mapping(meta, "session_meta")
        text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    except (SessionError, ValueError, TypeError) as exc:
        raise _Refusal("bad_session_meta", str(exc)) from None
    return text.encode("utf-8")


# -- the queue line --------------------------------------------------------------------


def _top_classes(rec: StoneRecord) -> list[tuple[float, str, str]]:
    joint = [(pc * pk, c, k) for c, pc in zip(COLORS, rec.p_color, strict=True)
             for k, pk in zip(CLARITIES, rec.p_clarity, strict=True)]
    return sorted(joint, reverse=True)


def priority_boosts(rec: StoneRecord) -> list[str]:
    """§5.3 signals of a stone (module docstring: the queue line's ``boosts``)."""
    top = _top_classes(rec)
    boosts = []
    if {DEFAULT_BINS[top[0][1]][top[0][2]], DEFAULT_BINS[top[1][1]][top[1][2]]} == {"CUT", "FLIP"}:
        boosts.append("cut_flip_boundary")
    if f"{top[0][1]}_{top[0][2]}" in RARE_CLASSES:
        boosts.append("rare_class")
    if NEAR_THRESHOLD[0] <= rec.confidence < NEAR_THRESHOLD[1]:
        boosts.append("near_threshold")
    return boosts


_BOOST = {"cut_flip_boundary": HIGH, "rare_class": MEDIUM, "near_threshold": LOW}


def _queue_line(rec: StoneRecord, sid: str, session: str, now: float) -> dict[str, Any]:
    top = _top_classes(rec)[0]
    score = uncertainty_score(rec.p_color, rec.p_clarity)
    boosts = priority_boosts(rec)
    return {
        "stone_id": sid, "sorter_id": rec.sorter_id, "batch": rec.batch, "sorter_stone_id": rec.stone_id,
        "session_id": session, "sorter_session_id": rec.session_id, "lot_id": rec.lot_id,
        "wall_time": rec.wall_time, "received": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "model_version": rec.model_version, "p_color": list(rec.p_color), "p_clarity": list(rec.p_clarity),
        "predicted": f"{top[1]}_{top[2]}", "decision": rec.decision, "route": rec.route,
        "confidence": rec.confidence, "size_mm": rec.size_mm, "pixels_per_mm": rec.pixels_per_mm,
        "crop_mm": rec.crop_mm, "reason": rec.reason, "uncertainty": round(score, 6), "boosts": boosts,
        "priority": round(score + sum(_BOOST[b] for b in boosts), 6),
        "images": {n: hashlib.sha256(rec.images[n]).hexdigest() for n in STONE_IMAGES},
    }


# -- helpers ---------------------------------------------------------------------------


def _disk_reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"disk {name}: {exc.strerror or exc}{where}; the record is not stored, send it again later"


def _frame_dirs(root: Path) -> list[Path]:
    processed = root / "images" / "processed"
    dirs = [processed / m for m in LIGHT_MODES]
    raw = root / "images" / "raw"
    if raw.is_dir():
        dirs += [s / m for s in sorted(raw.iterdir()) for m in LIGHT_MODES]
    return [d for d in dirs if d.is_dir()]


def _candidate_dirs(root: Path) -> list[Path]:
    """Every folder the inbox writes into (where a temp file may have been left)."""
    raw = root / "images" / "raw"
    sessions = sorted(p for p in raw.iterdir() if p.is_dir()) if raw.is_dir() else []
    dirs = [root, root / STATE_DIR, root / "images" / "processed", *_frame_dirs(root), *sessions,
            *(s / "reference" for s in sessions)]
    return [d for d in dirs if d.is_dir()]
