"""A labelled dataset in the §7.1 layout: reading, validating, loading crops.

    DIR/labels.jsonl                         §3.4, one stone per line
    DIR/images/processed/{backlit,toplit}/<stone_id>.png   ROI crops, any size
    DIR/images/raw/<session>/session_meta.json             §2.4 (+ pixels_per_mm)
    DIR/images/raw/<session>/{backlit,toplit}/<stone_id>.png, reference/
    DIR/splits/<version>/{train,val,test}.txt              (sorterd.train.splits)

Two layouts are accepted (`open_dataset`):

* *with processed crops* (``images/processed/`` exists): every label has its two crops there;
  raw frames, where present, are used as well (`sorterd.data.samples`);
* *raw frames only* (no ``images/processed/``: a capture program that stores whole frames):
  every label must trace to its raw frame pair -- a session with frames, reference frames and
  ``pixels_per_mm``, and a pair found by ``raw_pair`` or the stone's id range
  (`sorterd.data.samples.raw_link_problems` says which do not, and why).

Nothing here assumes the simulator made the data: a folder written by hand,
or by a real rig, works the same.  What a label line must hold:

* ``stone_id`` -- a file-name-safe string (§7.2 ``S000123`` is the convention);
* ``color`` in blue/light/inky and ``clarity`` in transparent/translucent/
  opaque -- or both ``null`` for a stone that was skipped (§3.2.3), which is
  what a ``"reject": true`` (non-gem) stone has;
* optional: ``lot_id``, ``session_id``, ``annotator``, ``timestamp``,
  ``notes`` (strings), the §3.4 flags ``uncertain``, ``mixed``, ``damaged``,
  ``reject`` (booleans, default false), ``size_mm`` (the segmenter's sieve
  size; else it is measured from the backlit crop when the session's
  ``pixels_per_mm`` is known).  Other fields are kept and ignored.

labels.jsonl is append-only (the review page, `sorterd.trainer.labels`, writes it; §3.4):

* a *retraction* line ``{"stone_id": ..., "retract": true, "annotator": ..., "timestamp": ...}``
  withdraws the stone's live label (the page's undo); the stone may then be labelled again on a
  later line.  A second live line for one stone (no retraction between) is still an error.
* second opinions (§3.3 agreement, §3.5 spot re-labelling) never go here: they go to
  ``DIR/review/checks.jsonl`` (same line format plus ``"check"``), so one live line per stone
  stays the rule and training uses the first annotator's label (§3.3: the gold annotator's
  decision is ground truth).  `effective_labels` is what training counts.
* a torn last line (no final newline, not valid JSON: the writer was killed mid-append) is
  skipped by readers and cut off by the next writer (`sorterd.trainer.labels`).

Every problem is reported as ``FILE:LINE: what is wrong``, all of them at
once (`DatasetError`), before any training starts -- never as a crash deep
inside torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.data.crops import fit_crop
from sorterd.domain import CLARITIES, COLORS, FLAGS, LIGHT_MODES
from sorterd.sorting.segment import DIFF_THRESHOLD

LABELS_FILE = "labels.jsonl"
PROCESSED_META = "processed_meta.json"  # images/processed/: {"crop_mm": ...}, written by sim generate
DEFAULT_CROP_MM = 6.4  # the shipped models' crop: 128 px at 20 px/mm
UNKNOWN_LOT = "LOT-UNKNOWN"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STRING_FIELDS = ("lot_id", "session_id", "annotator", "timestamp", "notes")


MAX_REPORTED = 20  # problems listed in one DatasetError; the rest are counted ("and N more")


class DatasetError(ValueError):
    """A dataset that cannot be used; each problem names the file (and line) and the fix.

    Validation collects every problem it finds (like the config does) and
    raises once; `problems` holds them all, the message lists the first
    MAX_REPORTED.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_listing(self.problems))


def _listing(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "".join(f"\n  - {p}" for p in problems[:MAX_REPORTED])
    more = len(problems) - MAX_REPORTED
    return f"{len(problems)} problems:{shown}" + (f"\n  ... and {more} more" if more > 0 else "")


def _collect(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    """check(*args), or None with its DatasetError's problems added to `problems`."""
    try:
        return check(*args)
    except DatasetError as exc:
        problems.extend(exc.problems)
        return None


@dataclass(frozen=True)
class StoneLabel:
    """One line of labels.jsonl, validated."""

    stone_id: str
    color: str | None
    clarity: str | None
    lot_id: str
    session_id: str
    flags: frozenset[str]
    notes: str
    size_mm: float | None
    line: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def classified(self) -> bool:
        """Has a colour and a clarity label (trainable, counted in class metrics)."""
        return self.color is not None and self.clarity is not None

    @property
    def class_name(self) -> str | None:
        """'blue_transparent' etc.; None for skipped / reject stones."""
        return f"{self.color}_{self.clarity}" if self.classified else None

    @property
    def reject(self) -> bool:
        return "reject" in self.flags

    @property
    def color_index(self) -> int:
        return COLORS.index(self.color or "")

    @property
    def clarity_index(self) -> int:
        return CLARITIES.index(self.clarity or "")


@dataclass(frozen=True)
class SessionInfo:
    """What the dataset reader needs of a session_meta.json."""

    session_id: str
    lot_id: str
    pixels_per_mm: float | None
    path: Path


@dataclass
class Dataset:
    """A §7.1 dataset folder with its validated labels."""

    root: Path
    labels: list[StoneLabel]
    sessions: dict[str, SessionInfo]

    @property
    def labels_path(self) -> Path:
        return self.root / LABELS_FILE

    def by_id(self) -> dict[str, StoneLabel]:
        return {lab.stone_id: lab for lab in self.labels}

    def image_path(self, mode: str, stone_id: str) -> Path:
        return self.root / "images" / "processed" / mode / f"{stone_id}.png"

    @property
    def raw_only(self) -> bool:
        """No images/processed/: the stones' inputs can only be cut from their raw frames."""
        return not (self.root / "images" / "processed").is_dir()

    def where(self, label: StoneLabel) -> str:
        """'DIR/labels.jsonl:LINE' for messages about one stone."""
        return f"{self.labels_path}:{label.line}"

    def lots(self) -> list[str]:
        return sorted({lab.lot_id for lab in self.labels})

    def crop_mm(self) -> float | None:
        """The physical square the processed crops cover, if the dataset records it."""
        path = self.root / "images" / "processed" / PROCESSED_META
        if not path.exists():
            return None
        try:
            value = json.loads(path.read_text())["crop_mm"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: needs {{\"crop_mm\": <mm>}} ({exc!r})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
            raise DatasetError(f"{path}: crop_mm = {value!r}: must be a length in mm, 0 < crop_mm < 100")
        return float(value)


# -- opening ---------------------------------------------------------------------------


def open_dataset(root: Path, check_images: bool = True) -> Dataset:
    """Read and validate DIR/labels.jsonl and the session metadata.

    check_images: with images/processed/, every stone's two processed crops must exist (their
    pixels are checked when loaded); without it (raw frames only), every label must trace to
    its raw frame pair (`sorterd.data.samples.raw_link_problems`; whether the stone is found in
    the pair is known only when it is cut, and a stone that is not is skipped, counted).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    labels, problems = _read_labels(root / LABELS_FILE)  # the good lines' images are checked too
    before = len(problems)
    ds = Dataset(root, labels, _collect(problems, read_sessions, root) or {})
    sessions_read = len(problems) == before
    if check_images and (sessions_read or not ds.raw_only):  # (unread sessions: every raw link would fail)
        problems += _image_problems(ds)
    if problems:
        raise DatasetError(problems)
    return ds


def _image_problems(ds: Dataset) -> list[str]:
    """What stops a stone's input from being made, by the dataset's layout."""
    if ds.raw_only:
        from sorterd.data.samples import raw_link_problems  # samples builds on this module

        return raw_link_problems(ds, ds.labels)
    return [f"{ds.where(lab)}: stone {lab.stone_id}: missing image {ds.image_path(mode, lab.stone_id)}"
            for lab in ds.labels for mode in LIGHT_MODES if not ds.image_path(mode, lab.stone_id).is_file()]


def read_labels(path: Path) -> list[StoneLabel]:
    """Every line of a labels.jsonl, validated (all problems at once); blank lines are skipped."""
    labels, problems = _read_labels(path)
    if problems:
        raise DatasetError(problems)
    return labels


def _read_labels(path: Path) -> tuple[list[StoneLabel], list[str]]:
    """The good lines of a labels.jsonl, and the problems of the others."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [f"{path}: missing (a dataset needs its labels.jsonl, §3.4)"]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot be read ({exc})"]
    live: dict[str, StoneLabel] = {}  # stone_id -> its live label, in first-labelled order
    problems: list[str] = []
    lines = text.splitlines()
    if lines and not text.endswith("\n") and is_torn(lines[-1]):
        lines.pop()  # a torn last line: the writer died mid-append; that label was never acknowledged
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        before = len(problems)
        retracted = _collect(problems, _retraction, line, f"{path}:{lineno}")
        if len(problems) > before:  # a retraction line, but a bad one
            continue
        if retracted is not None:
            if retracted not in live:
                problems.append(f"{path}:{lineno}: retracts stone_id {retracted!r}, which has no live label "
                                "above it; a retraction follows the label it withdraws")
            live.pop(retracted, None)
            continue
        lab = _collect(problems, parse_label, line, f"{path}:{lineno}", lineno)
        if lab is None:
            continue
        if lab.stone_id in live:
            problems.append(f"{path}:{lineno}: stone_id {lab.stone_id!r} already labelled on line "
                            f"{live[lab.stone_id].line}; keep one line per stone (or retract it first)")
            continue
        live[lab.stone_id] = lab
    return sorted(live.values(), key=lambda lab: lab.line), problems


def is_torn(line: str) -> bool:
    """A last line without its newline that is not a whole JSON value: an interrupted append."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return True
    return False


def _retraction(line: str, where: str) -> str | None:
    """The stone_id a retraction line withdraws, or None for any other line (parse_label judges it)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or "retract" not in rec:
        return None
    if rec["retract"] is not True:
        raise DatasetError(f"{where}: retract = {rec['retract']!r}: a retraction line has \"retract\": true")
    return _stone_id(rec, where)


def effective_labels(root: Path) -> list[StoneLabel]:
    """The labels training uses: DIR/labels.jsonl's live lines after retractions (undo), one per
    stone, the first annotator's; second opinions (DIR/review/checks.jsonl) are not among them."""
    return read_labels(Path(root) / LABELS_FILE)


def parse_label(line: str, where: str, lineno: int = 0) -> StoneLabel:
    """One labels.jsonl line -> StoneLabel; `where` prefixes every error ('FILE:LINE')."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: must be a JSON object {{\"stone_id\": ..., \"color\": ..., "
                           f"\"clarity\": ...}}, got {type(rec).__name__}")
    problems: list[str] = []  # every field's problem on this line, not only the first
    stone_id = _collect(problems, _stone_id, rec, where)
    flags = _collect(problems, _flags, rec, where)
    color = _collect(problems, _class_field, rec, "color", COLORS, where)
    clarity = _collect(problems, _class_field, rec, "clarity", CLARITIES, where)
    strings = {k: _collect(problems, _string_field, rec, k, where) for k in _STRING_FIELDS}
    size_mm = _collect(problems, _size_field, rec, where)
    if problems:
        raise DatasetError(problems)
    if (color is None) != (clarity is None):
        raise DatasetError(f"{where}: color {color!r} with clarity {clarity!r}: give both, or both null "
                           "(a skipped or reject stone)")
    if color is not None and "reject" in flags:
        raise DatasetError(f"{where}: a reject (non-gem) stone has no colour/clarity; set them to null")
    known = {"stone_id", "color", "clarity", "size_mm", *FLAGS, *_STRING_FIELDS}
    return StoneLabel(
        stone_id=stone_id, color=color, clarity=clarity, lot_id=strings["lot_id"] or UNKNOWN_LOT,
        session_id=strings["session_id"], flags=flags, notes=strings["notes"],
        size_mm=size_mm, line=lineno,
        extra={k: v for k, v in rec.items() if k not in known},
    )


def _stone_id(rec: dict[str, Any], where: str) -> str:
    if "stone_id" not in rec:
        raise DatasetError(f"{where}: lacks \"stone_id\"")
    sid = rec["stone_id"]
    if not isinstance(sid, str) or not _SAFE_ID.match(sid):
        raise DatasetError(f"{where}: stone_id {sid!r} must be a file-name-safe string like \"S000123\" "
                           "(letters, digits, '_', '-', '.')")
    return sid


def _class_field(rec: dict[str, Any], key: str, valid: tuple[str, ...], where: str) -> str | None:
    if key not in rec:
        raise DatasetError(f"{where}: lacks {key!r} (one of {', '.join(valid)}, or null for a skipped stone)")
    value = rec[key]
    if value is None:
        return None
    if value not in valid:
        raise DatasetError(f"{where}: unknown {key} {value!r}: valid {key} classes are {', '.join(valid)}")
    return str(value)


def _flags(rec: dict[str, Any], where: str) -> frozenset[str]:
    out = set()
    for name in FLAGS:
        value = rec.get(name, False)
        if not isinstance(value, bool):
            raise DatasetError(f"{where}: {name} = {value!r}: must be true or false")
        if value:
            out.add(name)
    return frozenset(out)


def _string_field(rec: dict[str, Any], key: str, where: str) -> str:
    value = rec.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key} = {value!r}: must be a string")
    return value


def _size_field(rec: dict[str, Any], where: str) -> float | None:
    value = rec.get("size_mm")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise DatasetError(f"{where}: size_mm = {value!r}: must be a number of millimetres, 0 < size_mm < 100")
    return float(value)


def read_sessions(root: Path) -> dict[str, SessionInfo]:
    """session_id -> SessionInfo for every images/raw/*/session_meta.json (none is fine)."""
    raw = root / "images" / "raw"
    out: dict[str, SessionInfo] = {}
    problems: list[str] = []
    for path in sorted(raw.glob("*/session_meta.json")) if raw.is_dir() else []:
        info = _collect(problems, _session_info, path)
        if info is None:
            continue
        if info.session_id in out:
            problems.append(f"{path}: session_id {info.session_id!r} is also used by {out[info.session_id].path}")
            continue
        out[info.session_id] = info
    if problems:
        raise DatasetError(problems)
    return out


def _session_info(path: Path) -> SessionInfo:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must hold a JSON object (§2.4 session metadata)")
    sid = meta.get("session_id", path.parent.name)
    ppm = meta.get("pixels_per_mm")
    if ppm is not None and (isinstance(ppm, bool) or not isinstance(ppm, (int, float)) or not 1.0 <= ppm <= 1000.0):
        raise DatasetError(f"{path}: pixels_per_mm = {ppm!r}: must be a number in 1..1000")
    return SessionInfo(str(sid), str(meta.get("lot_id", "")), float(ppm) if ppm else None, path)


# -- images ----------------------------------------------------------------------------


def read_crop(ds: Dataset, label: StoneLabel, mode: str) -> np.ndarray:
    """One processed crop as 8-bit BGR, whatever its size or format; errors name the stone."""
    path = ds.image_path(mode, label.stone_id)
    if not path.is_file():
        raise DatasetError(f"{ds.where(label)}: stone {label.stone_id}: missing image {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DatasetError(f"{ds.where(label)}: stone {label.stone_id}: {path} is not a readable image")
    return _as_bgr8(image, path, ds.where(label))


def _as_bgr8(image: np.ndarray, path: Path, where: str) -> np.ndarray:
    if image.dtype == np.uint16:  # 12/16-bit captures (§2.1): keep the top 8 bits
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DatasetError(f"{where}: {path}: {image.dtype} pixels; expected 8- or 16-bit")
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    if image.shape[2] == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    if image.shape[2] != 3:
        raise DatasetError(f"{where}: {path}: {image.shape[2]} channels; expected gray, BGR or BGRA")
    return image


def crop_scale(ds: Dataset, label: StoneLabel, image: np.ndarray) -> float | None:
    """The crop's px per mm: its session's `pixels_per_mm` (§2.4); else, for a square crop of a
    dataset whose processed_meta.json gives crop_mm, side / crop_mm; else None (unknown)."""
    info = ds.sessions.get(label.session_id)
    if info is not None and info.pixels_per_mm is not None:
        return info.pixels_per_mm
    h, w = image.shape[:2]
    covered = ds.crop_mm()
    return w / covered if covered is not None and h == w else None


def load_crops(ds: Dataset, labels: Sequence[StoneLabel], size: int, crop_mm: float | None = None) -> np.ndarray:
    """(N, size, size, 6) uint8: backlit RGB then toplit RGB, the daemon's crop_pair layout.

    Each crop goes through `sorterd.data.crops.fit_crop` at the model's `crop_mm` (default:
    the dataset's own, else DEFAULT_CROP_MM) and the crop's scale (`crop_scale`): aspect and
    physical size kept, padded with the crop's background, never stretched.
    """
    window = crop_mm or ds.crop_mm() or DEFAULT_CROP_MM
    out = np.empty((len(labels), size, size, 6), dtype=np.uint8)
    for i, lab in enumerate(labels):
        for k, mode in enumerate(LIGHT_MODES):
            image = read_crop(ds, lab, mode)
            out[i, :, :, 3 * k:3 * k + 3] = fit_crop(image, crop_scale(ds, lab, image), window, size)[:, :, ::-1]
    return out


def pixel_hash(ds: Dataset, label: StoneLabel) -> str:
    """sha256 of both crops' decoded pixels: the same capture saved twice hashes alike (§3.5)."""
    h = hashlib.sha256()
    for mode in LIGHT_MODES:
        image = read_crop(ds, label, mode)
        h.update(f"{image.shape}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Duplicate:
    stone_id: str
    same_as: str
    labels_agree: bool


def dedupe(ds: Dataset, labels: Iterable[StoneLabel]) -> tuple[list[StoneLabel], list[Duplicate]]:
    """Keep the first stone of every group with identical processed crops (§3.5, §7.4);
    `sorterd.data.samples.dedupe` also handles a raw-frames-only dataset."""
    return dedupe_by(labels, lambda lab: pixel_hash(ds, lab))


def dedupe_by(labels: Iterable[StoneLabel],
              digest_of: Callable[[StoneLabel], str | None]) -> tuple[list[StoneLabel], list[Duplicate]]:
    """Keep the first stone of every group with one image digest; a None digest is unique."""
    kept: list[StoneLabel] = []
    first: dict[str, StoneLabel] = {}
    dups: list[Duplicate] = []
    for lab in labels:
        digest = digest_of(lab)
        if digest is None:
            kept.append(lab)
            continue
        if digest in first:
            other = first[digest]
            agree = (other.color, other.clarity) == (lab.color, lab.clarity)
            dups.append(Duplicate(lab.stone_id, other.stone_id, agree))
            continue
        first[digest] = lab
        kept.append(lab)
    return kept, dups


# -- sizes -----------------------------------------------------------------------------


def stone_sizes(ds: Dataset, labels: Sequence[StoneLabel]) -> list[float | None]:
    """Each stone's sieve size in mm: from its label, else measured from its backlit crop
    when its session's pixels_per_mm is known, else None (unknown)."""
    sizes: list[float | None] = []
    for lab in labels:
        if lab.size_mm is not None:
            sizes.append(lab.size_mm)
            continue
        info = ds.sessions.get(lab.session_id)
        if info is None or info.pixels_per_mm is None:
            sizes.append(None)
            continue
        sizes.append(measure_size_mm(read_crop(ds, lab, "backlit"), info.pixels_per_mm))
    return sizes


def measure_size_mm(backlit: np.ndarray, pixels_per_mm: float) -> float | None:
    """Sieve size (min-area-rectangle short side) of the object in a backlit crop.

    The crop's own border is the background reference (the panel), so this
    needs no session reference frame; None when nothing stands out.
    """
    border = np.concatenate([backlit[0], backlit[-1], backlit[:, 0], backlit[:, -1]])
    background = np.median(border, axis=0).astype(np.int16)
    diff = np.abs(backlit.astype(np.int16) - background).max(axis=2)
    mask = (diff > DIFF_THRESHOLD).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    biggest = max(contours, key=cv2.contourArea)
    (_, _), (w, h), _ = cv2.minAreaRect(biggest)
    size = (min(w, h) + 1.0) / pixels_per_mm
    return size if math.isfinite(size) and size > 0 else None
