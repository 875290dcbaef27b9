"""The review page's label store: §3.4 lines appended to DIR/labels.jsonl, second opinions, undo.

    DIR/unlabelled.jsonl     the review queue (written by `sorterd.trainer.inbox`; read here)
    DIR/labels.jsonl         §3.4: one live line per stone, the first annotator's (training uses it)
    DIR/review/checks.jsonl  second opinions: the same §3.4 line plus "check": "second" (another
                             annotator's label of a stone already labelled: §3.3 agreement) or
                             "spot" (the same annotator re-labelling blind: §3.5)
    DIR/review/gold.json     the §3.3 gold set, chosen once: {"stone_ids": [...], "created": ...}
    DIR/review/spot.json     the current §3.5 spot set: {"annotator", "stone_ids", "created"}

Semantics (documented for readers in `sorterd.data.dataset`): both .jsonl files are append-only.
Undo appends a retraction line ``{"stone_id", "annotator", "retract": true, "timestamp"}`` to the
file the withdrawn label is in (labels.jsonl: the stone goes back to the queue; checks.jsonl: that
second opinion is withdrawn).  A person labels a stone once: a second label by the same annotator
while the first is live is refused (`Conflict`, HTTP 409), except a "spot" re-label.

Durability and concurrency.  One `LabelStore` per process holds the state in memory under one
lock; every append is a single ``os.write`` of the whole line to an ``O_APPEND`` descriptor, then
``fsync``, under the lock and an ``fcntl.flock`` on the file (a second process, e.g. `sorterd
review` beside `sorterd trainer`, is serialised too; a line written by another process is read
back before the next decision).  The call returns only after the fsync: an acknowledged label is
on disk.  A torn last line (the process was killed mid-write) is skipped by readers and cut off
here when the store opens.  Every method does file I/O: the web app calls them in a worker thread
(`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import secrets
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sorterd.data.dataset import LABELS_FILE, DatasetError, StoneLabel, effective_labels, is_torn, parse_label
from sorterd.data.files import write_json_atomic
from sorterd.domain import CLARITIES, COLORS, FLAGS

log = logging.getLogger(__name__)

QUEUE_FILE = "unlabelled.jsonl"  # sorterd.trainer.inbox.QUEUE_FILE (not imported: that pulls cv2 and the link)
REVIEW_DIR = "review"
CHECKS_FILE = "checks.jsonl"
GOLD_FILE = "gold.json"
SPOT_FILE = "spot.json"
MAX_NOTES = 2000  # characters
MAX_ANNOTATOR = 64
GOLD_SIZE = 50  # §3.3 asks 200 for a first agreement study; 50 is the page's default round
SPOT_SIZE = 50  # §3.5
SPOT_LIMIT = 0.10  # §3.5: disagreement above this is reported
CHECKS = ("second", "spot")


class LabelError(ValueError):
    """Bad input: the message says what was wrong and what is allowed (HTTP 400/404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Conflict(LabelError):
    """A label that contradicts what is stored (HTTP 409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 409)


@dataclass
class _Live:
    """One annotator's live label of one stone, and where it is."""

    record: dict[str, Any]
    file: str  # LABELS_FILE or CHECKS_FILE
    seq: int  # order of acknowledgement (undo takes the largest)


@dataclass
class _State:
    primary: dict[str, _Live] = field(default_factory=dict)  # stone_id -> labels.jsonl's live line
    checks: dict[tuple[str, str, str], _Live] = field(default_factory=dict)  # (stone, annotator, check)
    seq: int = 0


def now_iso() -> str:
    """Local time with its UTC offset (§3.4 timestamps: "2026-02-15T10:05:32+07:00")."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's κ of two raters' labels of the same items (§3.3); None with fewer than 2 items.

    κ = (p_o - p_e) / (1 - p_e); when both raters use one same class only (p_e = 1) κ is 1.0 if
    they agree everywhere.  (sklearn's cohen_kappa_score gives the same; it is not a dependency.)
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} and {len(b)} labels; both raters label the same items")
    n = len(a)
    if n < 2:
        return None
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if math.isclose(p_e, 1.0):
        return 1.0 if p_o == 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


class LabelStore:
    """The labels of one §7.1 dataset as the review page sees them (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LabelError(f"{self.root}: no such dataset folder (give the trainer's --data DIR)", 404)
        (self.root / REVIEW_DIR).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._queue: dict[str, dict[str, Any]] = {}
        self._queue_offset = 0
        self._offsets = {LABELS_FILE: 0, CHECKS_FILE: 0}  # bytes of each file applied to _state
        self._state = _State()
        with _flocked(self.labels_path):  # the one lock every writer of this dataset takes
            for path in (self.labels_path, self.checks_path):
                _repair_torn_tail(path)
        with self._lock:
            self._refresh()

    @property
    def labels_path(self) -> Path:
        return self.root / LABELS_FILE

    @property
    def checks_path(self) -> Path:
        return self.root / REVIEW_DIR / CHECKS_FILE

    # -- reading ---------------------------------------------------------------------------

    def stone(self, stone_id: str) -> dict[str, Any]:
        """The queue line of one stone (404 LabelError when the dataset has no such stone)."""
        with self._lock:
            self._refresh()
            return dict(self._known(stone_id))

    def queue(self, annotator: Any, limit: int, mode: str = "label") -> list[dict[str, Any]]:
        """Stones for `annotator`, highest §5.3 priority first.

        mode "label": not labelled by anyone yet, or labelled by someone else inside the gold set
        (§3.3: a second annotator labels the gold set blind); "gold": the gold stones this
        annotator has no label of; "spot": this annotator's current spot set, not yet re-labelled.
        Queue lines never carry anybody's label: the page is blind by construction.
        """
        name = check_annotator(annotator)
        with self._lock:
            self._refresh()
            ids = self._candidates(name, mode)
        items = [self._queue[s] for s in ids]
        items.sort(key=lambda q: (-float(q.get("priority", 0.0)), q["stone_id"]))
        return items[:limit]

    def _candidates(self, name: str, mode: str) -> list[str]:
        st = self._state
        if mode == "label":
            gold = set(self._gold_ids())
            return [s for s in self._queue if not self._has_label(s, name)
                    and (s not in st.primary or s in gold)]
        if mode == "gold":
            return [s for s in self._gold_ids() if s in self._queue and not self._has_label(s, name)]
        if mode == "spot":
            spot = self._spot()
            if spot is None or spot["annotator"] != name:
                return []
            return [s for s in spot["stone_ids"] if not self._spot_done(spot, s)]
        raise LabelError(f"mode {mode!r}: allowed modes are label, gold, spot")

    def _spot_done(self, spot: dict[str, Any], stone_id: str) -> bool:
        live = self._state.checks.get((stone_id, spot["annotator"], "spot"))
        return live is not None and live.record.get("spot_round") == spot.get("round")

    def _has_label(self, stone_id: str, name: str) -> bool:
        p = self._state.primary.get(stone_id)
        return (p is not None and p.record.get("annotator") == name) or (stone_id, name, "second") in self._state.checks

    def counts(self) -> dict[str, Any]:
        """§3.5 class distribution of the effective labels, the flags, and the queue length."""
        with self._lock:
            self._refresh()
            records = [live.record for live in self._state.primary.values()]
            unlabelled = sum(1 for s in self._queue if s not in self._state.primary)
        by_class = {f"{c}_{q}": 0 for c in COLORS for q in CLARITIES}
        by_class.update(Counter(f"{r['color']}_{r['clarity']}" for r in records if r.get("color")))
        return {"labelled": len(records), "queue": unlabelled, "stones": len(self._queue), "by_class": by_class,
                "by_color": {c: sum(v for k, v in by_class.items() if k.startswith(c + "_")) for c in COLORS},
                "by_clarity": {q: sum(v for k, v in by_class.items() if k.endswith("_" + q)) for q in CLARITIES},
                "flags": {f: sum(1 for r in records if r.get(f)) for f in FLAGS},
                "skipped": sum(1 for r in records if not r.get("color"))}

    def effective(self) -> list[StoneLabel]:
        """What training uses (`sorterd.data.dataset.effective_labels`)."""
        return effective_labels(self.root)

    # -- writing ---------------------------------------------------------------------------

    def add(self, body: Any) -> dict[str, Any]:
        """Validate one label from the page and append it; returns the stored §3.4 line.

        Where it goes: labels.jsonl when the stone has no live label; checks.jsonl as "second"
        when another annotator labelled it; "spot" when body["check"] == "spot".  Nothing is
        written on any error.
        """
        fields = _label_fields(body)
        name, sid = fields["annotator"], fields["stone_id"]
        with self._lock, _flocked(self.labels_path):
            self._refresh()
            q = self._known(sid)
            record = {"stone_id": sid, "color": fields["color"], "clarity": fields["clarity"],
                      "lot_id": q.get("lot_id", ""), "session_id": q.get("session_id", ""), "annotator": name,
                      "timestamp": now_iso(), **{f: fields[f] for f in FLAGS}, "notes": fields["notes"]}
            if q.get("size_mm") is not None:
                record["size_mm"] = q["size_mm"]
            check = fields["check"]
            primary = self._state.primary.get(sid)
            if check == "spot":
                spot = self._spot()
                if spot is None or spot["annotator"] != name or sid not in spot["stone_ids"]:
                    raise Conflict(f"stone {sid} is not in {name}'s current spot set; POST /api/spot starts one")
                if self._spot_done(spot, sid):
                    raise Conflict(f"stone {sid} already re-labelled by {name} in this spot round; undo it first")
                file = CHECKS_FILE
                record["spot_round"] = spot["round"]
            elif self._has_label(sid, name):
                raise Conflict(f"stone {sid} already labelled by {name}; undo (POST /api/undo) to change it")
            elif primary is None:
                file, check = LABELS_FILE, None
            else:
                file, check = CHECKS_FILE, "second"
            if check is not None:
                record["check"] = check
            parse_label(json.dumps(record), f"label of {sid}")  # what training reads must accept it
            self._append(file, record)
            return record

    def undo(self, annotator: Any) -> dict[str, Any]:
        """Withdraw `annotator`'s latest live label (a retraction line); returns the withdrawn label."""
        name = check_annotator(annotator)
        with self._lock, _flocked(self.labels_path):
            self._refresh()
            mine = [live for live in (*self._state.primary.values(), *self._state.checks.values())
                    if live.record.get("annotator") == name]
            if not mine:
                raise LabelError(f"annotator {name!r} has no label to undo", 404)
            last = max(mine, key=_recency)
            rec = last.record
            retraction: dict[str, Any] = {"stone_id": rec["stone_id"], "annotator": name, "retract": True,
                                          "timestamp": now_iso()}
            if "check" in rec:
                retraction["check"] = rec["check"]
            self._append(last.file, retraction)
            return rec

    def _append(self, file: str, record: dict[str, Any]) -> None:
        """One write of the whole line, fsync, then the in-memory state (the caller holds both locks)."""
        path = self.labels_path if file == LABELS_FILE else self.checks_path
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._refresh()  # reads our own line back: the state is what the file says

    # -- agreement (§3.3) and spot checks (§3.5) ---------------------------------------------

    def make_gold(self, size: int = GOLD_SIZE, seed: int | None = None) -> dict[str, Any]:
        """Choose the gold set once (random labelled stones) and store it; a second call returns it."""
        with self._lock, _flocked(self.labels_path):
            self._refresh()
            existing = self._gold()
            if existing is not None:
                return existing
            labelled = sorted(self._state.primary)
            if not labelled:
                raise Conflict("no labelled stones yet: label some before choosing the gold set (§3.3)")
            ids = sorted(random.Random(seed).sample(labelled, min(size, len(labelled))))
            gold = {"stone_ids": ids, "created": now_iso()}
            write_json_atomic(self.root / REVIEW_DIR / GOLD_FILE, gold)
            return gold

    def make_spot(self, annotator: Any, size: int = SPOT_SIZE, seed: int | None = None) -> dict[str, Any]:
        """A new §3.5 spot round: `size` random stones `annotator` labelled, to re-label blind."""
        name = check_annotator(annotator)
        with self._lock, _flocked(self.labels_path):
            self._refresh()
            mine = sorted(s for s, live in self._state.primary.items()
                          if live.record.get("annotator") == name and live.record.get("color"))
            if not mine:
                raise Conflict(f"annotator {name!r} has no classified labels to re-label (§3.5)")
            ids = sorted(random.Random(seed).sample(mine, min(size, len(mine))))
            spot = {"annotator": name, "stone_ids": ids, "created": now_iso(), "round": secrets.token_hex(8)}
            write_json_atomic(self.root / REVIEW_DIR / SPOT_FILE, spot)
            return spot

    def agreement(self) -> dict[str, Any]:
        """§3.3: κ per head for each two annotators who labelled the same stones, disagreements listed."""
        with self._lock:
            self._refresh()
            pairs = [(self._state.primary[s].record, live.record) for (s, _, check), live in self._state.checks.items()
                     if check == "second" and s in self._state.primary]
        by_pair: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for first, second in pairs:  # κ is symmetric: one entry per two people, whoever labelled first
            a, b = str(first.get("annotator", "")), str(second["annotator"])
            key, item = ((a, b), (first, second)) if a <= b else ((b, a), (second, first))
            by_pair.setdefault(key, []).append(item)
        gold = set(self._gold_ids())
        out = []
        for (a, b), items in sorted(by_pair.items()):
            both = [(x, y) for x, y in items if x.get("color") and y.get("color")]
            out.append({
                "first": a, "second": b, "stones": len(items), "classified_by_both": len(both),
                "gold_stones": sum(1 for x, _ in items if x["stone_id"] in gold),
                "kappa_color": cohen_kappa([x["color"] for x, _ in both], [y["color"] for _, y in both]),
                "kappa_clarity": cohen_kappa([x["clarity"] for x, _ in both], [y["clarity"] for _, y in both]),
                "disagreements": [_disagreement(x, y) for x, y in items
                                  if (x.get("color"), x.get("clarity")) != (y.get("color"), y.get("clarity"))],
            })
        return {"target_kappa": 0.75, "gold_set": sorted(gold), "pairs": out}

    def spot_report(self) -> dict[str, Any]:
        """§3.5: the current spot round's disagreement with the annotator's earlier labels."""
        with self._lock:
            self._refresh()
            spot = self._spot()
            if spot is None:
                return {"spot": None}
            name = spot["annotator"]
            done = [(self._state.primary[s].record, self._state.checks[(s, name, "spot")].record)
                    for s in spot["stone_ids"] if self._spot_done(spot, s) and s in self._state.primary]
        differ = [_disagreement(x, y) for x, y in done
                  if (x.get("color"), x.get("clarity")) != (y.get("color"), y.get("clarity"))]
        rate = len(differ) / len(done) if done else None
        return {"spot": spot, "relabelled": len(done), "remaining": len(spot["stone_ids"]) - len(done),
                "disagreement": rate, "limit": SPOT_LIMIT, "investigate": rate is not None and rate > SPOT_LIMIT,
                "disagreements": differ}

    # -- state ---------------------------------------------------------------------------------

    def _known(self, stone_id: str) -> dict[str, Any]:
        q = self._queue.get(stone_id)
        if q is None:
            raise LabelError(f"unknown stone_id {stone_id!r}: not in {self.root / QUEUE_FILE} "
                             "(GET /api/queue lists the stones to label)", 404)
        return q

    def _gold(self) -> dict[str, Any] | None:
        return _read_json(self.root / REVIEW_DIR / GOLD_FILE)

    def _gold_ids(self) -> list[str]:
        gold = self._gold()
        return list(gold["stone_ids"]) if gold else []

    def _spot(self) -> dict[str, Any] | None:
        return _read_json(self.root / REVIEW_DIR / SPOT_FILE)

    def _refresh(self) -> None:
        """Read what was appended since the last look (the inbox, another process): the lock is held."""
        self._read_queue_tail()
        paths = {LABELS_FILE: self.labels_path, CHECKS_FILE: self.checks_path}
        if any(_size(path) < self._offsets[f] for f, path in paths.items()):  # cut short: start over
            self._state, self._offsets = _State(), dict.fromkeys(paths, 0)
        for file, path in paths.items():
            self._offsets[file] += self._apply_tail(file, path, self._offsets[file])

    def _apply_tail(self, file: str, path: Path, offset: int) -> int:
        """Apply the whole lines of `path` after `offset`; returns how many bytes were taken."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1  # a line still being written (or torn) is left for later
        for rec in _parse_lines(data[:end], path):
            self._apply(file, rec)
        return end

    def _apply(self, file: str, rec: dict[str, Any]) -> None:
        st = self._state
        st.seq += 1
        sid, name, check = str(rec["stone_id"]), str(rec.get("annotator", "")), str(rec.get("check", ""))
        retract = rec.get("retract") is True
        if file == LABELS_FILE:
            if retract:
                st.primary.pop(sid, None)
            elif sid not in st.primary:
                st.primary[sid] = _Live(rec, file, st.seq)
        elif retract:
            st.checks.pop((sid, name, check), None)
        else:
            st.checks[(sid, name, check)] = _Live(rec, file, st.seq)

    def _read_queue_tail(self) -> None:
        path = self.root / QUEUE_FILE
        try:
            with open(path, "rb") as f:
                f.seek(self._queue_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # an unfinished last line is the inbox mid-append: next time
        for line in data[:end].splitlines():
            try:
                q = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping an unreadable queue line", path)
                continue
            if isinstance(q, dict) and isinstance(q.get("stone_id"), str):
                self._queue.setdefault(q["stone_id"], q)
        self._queue_offset += end


def check_annotator(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ANNOTATOR or "\n" in value:
        raise LabelError(f"annotator {value!r}: must be a non-empty name of at most {MAX_ANNOTATOR} characters "
                         "(the page's name field)")
    return value.strip()


def _label_fields(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise LabelError("the body must be a JSON object {\"stone_id\", \"annotator\", \"color\", \"clarity\", "
                         "\"uncertain\", \"mixed\", \"damaged\", \"reject\", \"notes\"}")
    allowed = {"stone_id", "annotator", "color", "clarity", "notes", "check", *FLAGS}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise LabelError(f"unknown field(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}")
    sid = body.get("stone_id")
    if not isinstance(sid, str) or not sid:
        raise LabelError(f"stone_id {sid!r}: must be the stone's id string from GET /api/queue")
    out: dict[str, Any] = {"stone_id": sid, "annotator": check_annotator(body.get("annotator"))}
    for key, valid in (("color", COLORS), ("clarity", CLARITIES)):
        value = body.get(key)
        if value is not None and value not in valid:
            raise LabelError(f"unknown {key} {value!r}: allowed are {', '.join(valid)}, or null (reject or skip)")
        out[key] = value
    for flag in FLAGS:
        value = body.get(flag, False)
        if not isinstance(value, bool):
            raise LabelError(f"{flag} = {value!r}: must be true or false")
        out[flag] = value
    if (out["color"] is None) != (out["clarity"] is None):
        raise LabelError(f"color {out['color']!r} with clarity {out['clarity']!r}: give both, or both null "
                         "(a skipped or reject stone)")
    if out["reject"] and out["color"] is not None:
        raise LabelError("a reject (not a sapphire) has no colour or clarity: send both null")
    notes = body.get("notes", "")
    if notes is None:
        notes = ""
    if not isinstance(notes, str) or len(notes) > MAX_NOTES:
        shown = f"{len(notes)} characters" if isinstance(notes, str) else repr(notes)
        raise LabelError(f"notes: {shown}: must be a string of at most {MAX_NOTES} characters")
    out["notes"] = notes
    check = body.get("check")
    if check not in (None, "spot"):
        raise LabelError(f"check {check!r}: allowed is \"spot\" (a §3.5 blind re-label) or absent")
    out["check"] = check
    return out


def _recency(live: _Live) -> tuple[float, int]:
    """Undo takes the latest label: by its timestamp (the two files interleave in time), then file order."""
    try:
        when = datetime.fromisoformat(str(live.record.get("timestamp", ""))).timestamp()
    except ValueError:
        when = 0.0
    return when, live.seq


def _disagreement(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {"stone_id": first["stone_id"],
            "first": {k: first.get(k) for k in ("annotator", "color", "clarity", "notes")},
            "second": {k: second.get(k) for k in ("annotator", "color", "clarity", "notes")}}


def _parse_lines(data: bytes, path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of whole .jsonl lines; a bad line is logged and skipped (the strict reader,
    `sorterd.data.dataset.read_labels`, names it when training)."""
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s: a line that is not valid JSON; ignored", path)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("stone_id"), str):
            yield rec


def _repair_torn_tail(path: Path) -> None:
    """Cut a torn last line off (the writer was killed mid-append), so the next append starts clean;
    the caller holds the dataset's flock."""
    try:
        with open(path, "r+b") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            tail = data[keep:].decode("utf-8", "replace")
            if not is_torn(tail):  # a whole line lacking only its newline: keep it, finish it
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                log.warning("%s: cutting off a torn last line (%d bytes, never acknowledged)", path, len(data) - keep)
                f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        return


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` + '.lock' (other processes writing the same dataset)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc}); remove it to choose again") from None
    return value if isinstance(value, dict) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0  # not yet written: nothing applied from it either
