"""The trainer's sample loader: each labelled stone's model input, cut as the sorter cuts it.

Where a stone's label can be traced to its raw frame pair (§7.1 ``images/raw/<session>/``, with
the session's reference frames and ``pixels_per_mm``, §2.4), its input is made from the raw
frames by the sorter's own calls -- `segment_pair` against the session's references (the
pairing limits of the built-in `[geometry]`/`[decision]` defaults, the pair's own interval from
frames.jsonl, as a replay has it), then `crop_pair` with ``crop_px(crop_mm, pixels_per_mm)``:
train/serve parity by construction.  Otherwise its processed crop goes through `fit_crop`
(`sorterd.data.dataset.load_crops`), counted as such.

How a label refers to its raw frames (the fields a §3.4 line may carry besides its own):

* the session: ``session_id`` -> that session's ``images/raw/<dir>/session_meta.json``;
* the pair: ``raw_pair`` (the pair's file name without .png); without it, the pair named
  after the stone itself, else the pair whose id range holds it -- ``sorterd run --record``
  names a pair after its first new stone and numbers the others on up to the next pair's
  name (`sorterd.data.session.pair_stone_ids`);
* the stone in the pair: ``raw_x_mm``, ``raw_y_mm`` -- its centroid in the toplit frame in
  mm from the frame's top-left corner (the sorter's `Observation.x_mm`/``y_mm``).  The one
  object within MATCH_TOLERANCE_MM of it is the stone.  Without a position, the match is by
  order only where that is certain: every object of the pair is new (the pair's id range is
  exactly as wide as its objects are many), so the recording named them in segmentation order.

A label without a link (no session, a session without frames, references or scale, a stone
outside every pair's id range) falls back to its processed crop -- *counted* ("fallback"); so does,
with "auto", one without a position whose pair holds stones not named after it (the trainer's inbox
keeps each flagged stone's whole pair, beside the sorter's own crop of it).  A
label whose link is there but whose stone cannot be matched (no object near the position, two
near it, a cluster, a missing pair) is *skipped* with its reason: never a wrong crop, never a
silent substitute.  `source` "raw" skips the unlinked ones too, "processed" is the old path.

A dataset without ``images/processed/`` (raw frames only, `Dataset.raw_only`) is opened only when
every label traces to its raw frames (`raw_link_problems`); its duplicates (§3.5) are found by the
digest of each stone's input as cut (`dedupe`), and "processed" is refused (`check_source`).

Nothing here assumes the simulator made the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.config import DecisionConfig, GeometryConfig
from sorterd.data.crops import crop_px
from sorterd.data.dataset import (
    DEFAULT_CROP_MM,
    Dataset,
    DatasetError,
    Duplicate,
    StoneLabel,
    dedupe_by,
    load_crops,
)
from sorterd.data.dataset import dedupe as dedupe_crops
from sorterd.data.session import PAIR_IDS_MAX, SessionError, SessionReader, stone_order
from sorterd.domain import LIGHT_MODES
from sorterd.sorting.segment import Observation, PairingLimits, crop_pair, segment_pair

SOURCES = ("auto", "raw", "processed")
DEFAULT_SOURCE = "auto"  # `sorterd train --crops` and `sorterd evaluate --crops`
INPUT_CACHE = ".cache/inputs"  # under the dataset: inputs cut from raw frames (content-addressed, never stale)
DEDUPE_CHUNK = 512  # stones cut at a time to hash a raw-only dataset's inputs (memory, not speed)
UNPLACED = "ambiguous: no raw_x_mm/raw_y_mm, and its pair holds objects not named after it"
MATCH_TOLERANCE_MM = 0.75  # half the smallest stone (1.5 mm, §6.4): two stones are never this close
_NUMBERED = re.compile(r"^S(\d+)$")


@dataclass
class SampleReport:
    """Where each sample's input came from; reasons are counted by kind, with examples."""

    raw: int = 0
    processed: int = 0
    fallback: Counter[str] = field(default_factory=Counter)  # why a processed crop was used
    skipped: Counter[str] = field(default_factory=Counter)  # why a stone was left out
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first stone ids

    def note(self, kind: Counter[str], reason: str, stone_id: str) -> None:
        kind[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 3:
            ids.append(stone_id)

    def line(self, name: str) -> str:
        """One line for `sorterd train`: how many from raw frames, processed crops, skipped, and why."""
        return (f"inputs ({name}): {self.raw} from raw frames, {self.processed} from processed crops"
                f"{_reasons(self.fallback, self.examples)}, {sum(self.skipped.values())} skipped"
                f"{_reasons(self.skipped, self.examples)}")

    def as_dict(self) -> dict[str, Any]:
        return {"raw": self.raw, "processed": self.processed, "fallback": dict(self.fallback),
                "skipped": dict(self.skipped)}

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, other: SampleReport) -> None:
        """Count `other`'s stones in too (one report for a set loaded in batches)."""
        self.raw += other.raw
        self.processed += other.processed
        self.fallback.update(other.fallback)
        self.skipped.update(other.skipped)
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ids[:max(0, 3 - len(mine))])

    def skipped_text(self) -> str:
        """'N skipped (reason: n, e.g. ids; ...)' for a warning."""
        return f"{self.n_skipped} skipped{_reasons(self.skipped, self.examples)}"


def _reasons(counts: Counter[str], examples: dict[str, list[str]]) -> str:
    if not counts:
        return ""
    parts = [f"{reason}: {n}, e.g. {', '.join(examples.get(reason, []))}" for reason, n in counts.most_common()]
    return " (" + "; ".join(parts) + ")"


@dataclass(frozen=True)
class RawLink:
    """Where a label's stone is in the raw frames."""

    session: str  # the session_id
    pair: str
    position_mm: tuple[float, float] | None  # toplit centroid (x, y), when the label records it


def load_samples(ds: Dataset, labels: Sequence[StoneLabel], size: int, crop_mm: float | None = None,
                 source: str = "auto", cache: Path | None = None) -> tuple[list[StoneLabel], np.ndarray, SampleReport]:
    """(the labels kept, their (N, size, size, 6) uint8 inputs, where they came from).

    source: "auto" raw frames where the label links to them, else the processed crop;
    "raw" raw frames only (unlinked stones skipped); "processed" processed crops only.
    A label line with a malformed link field is a DatasetError (all such problems at once).
    cache: a folder for the inputs cut from raw frames (`InputCache`; None: none kept).
    """
    check_source(ds, source)
    window = crop_mm or ds.crop_mm() or DEFAULT_CROP_MM
    report = SampleReport()
    if source == "processed":
        report.processed = len(labels)
        return list(labels), load_crops(ds, labels, size, window), report
    raws = _RawSessions(ds)
    links = _links(ds, labels, raws)
    unplaced: dict[str, str] = {}  # linked, but no position to tell it among its pair's stones
    cut = _cut_linked(raws, [(lab, link) for lab, link in links if isinstance(link, RawLink)],
                      size, window, report, InputCache(cache) if cache is not None else None,
                      unplaced if source == "auto" and not ds.raw_only else None)
    kept: list[StoneLabel] = []
    images: list[np.ndarray] = []
    for lab, link in links:
        if isinstance(link, RawLink):
            if lab.stone_id in cut:
                kept.append(lab)
                images.append(cut[lab.stone_id])
                report.raw += 1
            elif lab.stone_id in unplaced:  # its processed crop is the capture program's cut of just it
                report.note(report.fallback, unplaced[lab.stone_id], lab.stone_id)
                kept.append(lab)
                images.append(load_crops(ds, [lab], size, window)[0])
                report.processed += 1
        elif source == "raw":
            report.note(report.skipped, f"no raw link: {link}", lab.stone_id)
        else:
            report.note(report.fallback, link, lab.stone_id)
            kept.append(lab)
            images.append(load_crops(ds, [lab], size, window)[0])
            report.processed += 1
    x = np.stack(images) if images else np.empty((0, size, size, 6), np.uint8)
    return kept, x, report


def check_source(ds: Dataset, source: str) -> None:
    """A ValueError for an unknown source; a DatasetError for "processed" on a raw-only dataset."""
    if source not in SOURCES:
        raise ValueError(f"crop source {source!r}: must be one of {', '.join(SOURCES)}")
    if source == "processed" and ds.raw_only:
        raise DatasetError(f"{ds.root}: has only raw frames (no images/processed/), so --crops processed has "
                           "no crops to read: choose --crops auto or --crops raw (each input cut from its raw "
                           "frame pair, as the sorter cuts it)")


def dedupe(ds: Dataset, labels: Sequence[StoneLabel], size: int, crop_mm: float | None = None,
           cache: Path | None = None) -> tuple[list[StoneLabel], list[Duplicate]]:
    """§3.5 duplicates: by the processed crops' pixels (`sorterd.data.dataset.dedupe`), or, on a
    raw-only dataset, by the digest of each stone's input as cut from its raw frames at this
    size and crop (the same capture saved twice cuts alike).  A stone that cannot be cut is
    kept here; loading it skips it, counted."""
    if not ds.raw_only:
        return dedupe_crops(ds, labels)
    digests: dict[str, str] = {}
    for start in range(0, len(labels), DEDUPE_CHUNK):
        kept, x, _ = load_samples(ds, labels[start:start + DEDUPE_CHUNK], size, crop_mm, "raw", cache)
        digests.update((lab.stone_id, hashlib.sha256(image.tobytes()).hexdigest())
                       for lab, image in zip(kept, x, strict=True))
    return dedupe_by(labels, lambda lab: digests.get(lab.stone_id))


def raw_link_problems(ds: Dataset, labels: Sequence[StoneLabel]) -> list[str]:
    """Why some labels of a raw-only dataset cannot be traced to their raw frames ([] = all can):
    a first line with the layouts allowed, then one line per label."""
    raws = _RawSessions(ds)
    problems: list[str] = []
    untraced = 0
    for lab in labels:
        try:
            link = _link(lab, raws)
        except DatasetError as exc:
            untraced += 1
            problems.extend(f"{ds.where(lab)}: stone {lab.stone_id}: {p}" for p in exc.problems)
            continue
        if isinstance(link, RawLink):
            reader = raws.reader(link.session)
            assert not isinstance(reader, str)  # a link is made only to a readable session
            if link.pair in reader.stone_ids:
                continue
            why = f"its raw_pair {link.pair!r} is not in its session ({reader.dir / 'backlit'})"
        else:
            why = link
        untraced += 1
        problems.append(f"{ds.where(lab)}: stone {lab.stone_id}: not traceable to raw frames: {why}")
    if not problems:
        return []
    head = (f"{ds.root}: has no images/processed/, so each stone's input is cut from its raw frames, and "
            f"{untraced} of {len(labels)} labels cannot be traced to them. A label traces to its raw frames by "
            "its session_id (an images/raw/<session>/ with session_meta.json giving pixels_per_mm, "
            "reference/backlit.png and reference/toplit.png, and frame pairs in backlit/ and toplit/) and its "
            "pair (raw_pair, else the pair named after the stone or whose id range holds it). Fix those labels, "
            "or give every stone its processed crops, images/processed/{backlit,toplit}/<stone_id>.png (§7.1)")
    return [head, *problems]


# -- links -------------------------------------------------------------------------------


class _RawSessions:
    """The dataset's sessions that hold raw frames, opened once each (read by one thread)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._readers: dict[str, SessionReader | str | DatasetError] = {}

    def reader(self, session_id: str) -> SessionReader | str:
        """The session's reader, or why its raw frames cannot be used (the fallback reason);
        a DatasetError for a session whose frames are there but broken (raised each time asked)."""
        if session_id not in self._readers:
            try:
                self._readers[session_id] = self._open(session_id)
            except DatasetError as exc:
                self._readers[session_id] = exc  # one read of a broken session, however many labels
        got = self._readers[session_id]
        if isinstance(got, DatasetError):
            raise got
        return got

    def _open(self, session_id: str) -> SessionReader | str:
        info = self.ds.sessions.get(session_id)
        if info is None:
            return "no session (its session_id names no images/raw/*/session_meta.json)"
        folder = info.path.parent
        if not any((folder / "backlit").glob("*.png")):
            return "no raw frames in its session"
        if not all((folder / "reference" / f"{m}.png").is_file() for m in LIGHT_MODES):
            return "no reference frames in its session"
        if info.pixels_per_mm is None:
            return "no pixels_per_mm in its session"
        try:
            return SessionReader(folder)
        except SessionError as exc:
            raise DatasetError(f"{folder}: raw session unusable: {exc}") from None


def _links(ds: Dataset, labels: Sequence[StoneLabel], raws: _RawSessions) -> list[tuple[StoneLabel, RawLink | str]]:
    problems: list[str] = []
    out: list[tuple[StoneLabel, RawLink | str]] = []
    for lab in labels:
        try:
            out.append((lab, _link(lab, raws)))
        except DatasetError as exc:
            problems.extend(f"{ds.where(lab)}: {p}" for p in exc.problems)
    if problems:
        raise DatasetError(problems)
    return out


def _link(lab: StoneLabel, raws: _RawSessions) -> RawLink | str:
    position = _position(lab.extra)
    pair = lab.extra.get("raw_pair")
    if pair is not None and (not isinstance(pair, str) or not pair or "/" in pair):
        raise DatasetError(f"raw_pair = {pair!r}: must be the name of a pair in the session's backlit/ "
                           "(the file name without .png)")
    reader = raws.reader(lab.session_id)
    if isinstance(reader, str):
        return reader
    if pair is None:
        found = _pair_holding(lab.stone_id, reader.stone_ids)
        if found is None:
            return "in no recorded pair's id range (no raw_pair)"
        pair = found
    return RawLink(lab.session_id, pair, position)


def _position(extra: dict[str, Any]) -> tuple[float, float] | None:
    x, y = extra.get("raw_x_mm"), extra.get("raw_y_mm")
    if x is None and y is None:
        return None
    bad = [f"{k} = {v!r}" for k, v in (("raw_x_mm", x), ("raw_y_mm", y))
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 10_000]
    if bad:
        raise DatasetError(f"{', '.join(bad)}: raw_x_mm and raw_y_mm are both given, each a number of mm "
                           "(0 .. 10000) from the toplit frame's top-left corner")
    return float(x), float(y)  # type: ignore[arg-type]


def _pair_holding(stone_id: str, pairs: list[str]) -> str | None:
    """The pair named after the stone, else the last numbered pair before it whose id range holds it."""
    if stone_id in pairs:
        return stone_id
    m = _NUMBERED.match(stone_id)
    if m is None:
        return None
    number, width = int(m.group(1)), len(m.group(1))
    before = [p for p in pairs if (pm := _NUMBERED.match(p)) and len(pm.group(1)) == width
              and int(pm.group(1)) < number]
    if not before:
        return None
    first = max(before, key=stone_order)
    return first if number - int(first[1:]) < PAIR_IDS_MAX else None


# -- cutting -----------------------------------------------------------------------------


def pairing_limits(pixels_per_mm: float, pair_interval_ms: float) -> PairingLimits:
    """The sorter's pairing limits at the built-in [geometry] and [decision] defaults."""
    g, d = GeometryConfig(), DecisionConfig()
    return PairingLimits(pixels_per_mm, pair_interval_ms / 1e3, g.speed_min_mm_s, g.speed_max_mm_s,
                         d.max_single_length_mm)


def segment_recorded(reader: SessionReader, pair: str) -> tuple[np.ndarray, np.ndarray, list[Observation]]:
    """One recorded pair segmented as the sorter segments it on replay: (backlit, toplit, objects).

    The pair's exposure instants are its frames.jsonl times, else the nominal interval
    (what `sorterd.parts.camera.replay` gives the pipeline)."""
    backlit, toplit = reader.read_pair(pair)
    meta = reader.meta
    if reader.times is not None:
        t_back, t_top = reader.times[pair].t_backlit_ns, reader.times[pair].t_toplit_ns
    else:
        t_back, t_top = 0, int(meta.pair_interval_ms * 1e6)
    seg = segment_pair(backlit, toplit, reader.references["backlit"], reader.references["toplit"], t_top,
                       pairing_limits(meta.pixels_per_mm, meta.pair_interval_ms), t_backlit_ns=t_back)
    return backlit, toplit, seg.observations


def _cut_linked(raws: _RawSessions, linked: list[tuple[StoneLabel, RawLink]], size: int, crop_mm: float,
                report: SampleReport, cache: InputCache | None,
                unplaced: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """stone_id -> its input, for every linked stone that matches one object of its pair;
    one segmentation per pair, however many of its stones are labelled, none when all are cached.
    `unplaced`: where a stone without raw_x_mm/raw_y_mm shares its pair with stones not named after
    it (the trainer's inbox keeps a flagged stone's whole pair) goes, with the reason, instead of
    the skips -- for the caller to use its processed crop."""
    by_pair: dict[tuple[str, str], list[tuple[StoneLabel, RawLink]]] = {}
    for lab, link in linked:
        by_pair.setdefault((link.session, link.pair), []).append((lab, link))
    out: dict[str, np.ndarray] = {}
    for (session, pair), members in by_pair.items():
        reader = raws.reader(session)
        assert not isinstance(reader, str)  # a link is made only to a readable session
        if pair not in reader.stone_ids:
            for lab, _ in members:
                report.note(report.skipped, "its raw_pair is not in its session", lab.stone_id)
            continue
        keys = {lab.stone_id: cache.key(reader, pair, size, crop_mm, lab, link) for lab, link in members} if cache else {}
        hits = {sid: hit for sid, key in keys.items() if cache and (hit := cache.get(key, size)) is not None}
        if len(hits) == len(members):
            out.update(hits)
            continue
        backlit, toplit, objects = segment_recorded(reader, pair)
        px = crop_px(crop_mm, reader.meta.pixels_per_mm)
        for lab, link in members:
            got = _match(lab, link, objects, reader)
            if isinstance(got, str):
                if unplaced is not None and got == UNPLACED:
                    unplaced[lab.stone_id] = got
                else:
                    report.note(report.skipped, got, lab.stone_id)
                continue
            out[lab.stone_id] = crop_pair(backlit, toplit, got, px, size)
            if cache is not None:
                cache.put(keys[lab.stone_id], out[lab.stone_id])
    return out


def _match(lab: StoneLabel, link: RawLink, objects: list[Observation], reader: SessionReader) -> Observation | str:
    """The labelled stone's object in its pair, or why it cannot be told (a skip reason)."""
    if link.position_mm is None:
        return _match_by_order(lab, link, objects, reader)
    x, y = link.position_mm
    near = [o for o in objects if math.hypot(o.x_mm - x, o.y_mm - y) <= MATCH_TOLERANCE_MM]
    if not near:
        return f"not found: no object within {MATCH_TOLERANCE_MM} mm of raw_x_mm/raw_y_mm in its raw pair"
    if len(near) > 1:
        return f"ambiguous: several objects within {MATCH_TOLERANCE_MM} mm of raw_x_mm/raw_y_mm"
    return _single(near[0])


def _match_by_order(lab: StoneLabel, link: RawLink, objects: list[Observation],
                    reader: SessionReader) -> Observation | str:
    ids = reader.stone_ids
    k = ids.index(link.pair)
    width = _range_width(link.pair, ids[k + 1] if k + 1 < len(ids) else None)
    if width is None and len(objects) == 1:
        width = 1  # a recorded pair has a new stone: its only object is it
    if width != len(objects):
        return UNPLACED
    index = _offset(lab.stone_id, link.pair)
    if index is None or not 0 <= index < len(objects):
        return "not found: its id is not one of its pair's objects"
    return _single(objects[index])


def _offset(stone_id: str, pair: str) -> int | None:
    """The stone's place among its pair's new objects (S000012 in pair S000011: 1)."""
    if stone_id == pair:
        return 0
    m, p = _NUMBERED.match(stone_id), _NUMBERED.match(pair)
    if m is None or p is None or len(m.group(1)) != len(p.group(1)):
        return None
    return int(m.group(1)) - int(p.group(1))


def _range_width(pair: str, next_pair: str | None) -> int | None:
    """How many stone ids a recording gave this pair: up to the next pair's name (1 for the
    last pair or a hand-named one only when that is all it can hold)."""
    m, n = _NUMBERED.match(pair), _NUMBERED.match(next_pair) if next_pair is not None else None
    if m is None:
        return 1
    if n is None or len(n.group(1)) != len(m.group(1)):
        return None
    return int(n.group(1)) - int(m.group(1))


def _single(obs: Observation) -> Observation | str:
    return "cluster: touching stones (the sorter never classifies one as a stone)" if obs.cluster else obs


# -- cache ---------------------------------------------------------------------------------

_CODE = ("sorterd/data/samples.py", "sorterd/data/crops.py", "sorterd/sorting/segment.py")


def _code_digest() -> str:
    """sha256 of the code that cuts an input: a changed segmentation never reads an old entry."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in _CODE:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


class InputCache:
    """Inputs cut from raw frames, content-addressed: the key is the sha256 of everything the cut
    depends on -- the pair's and the references' file bytes, the session's scale and pair
    interval, the pair's times, the window, the output size, the pairing limits, the label's
    link, and the cutting code itself -- so an entry is never stale, only unused.  Entries are
    .npy files written by atomic rename; one that cannot be read or written is simply recomputed
    (a read-only dataset works without a cache).  One thread uses it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._code = _code_digest()
        self._files: dict[Path, str] = {}  # file -> sha256 of its bytes, read once per load

    def _file(self, path: Path) -> str:
        digest = self._files.get(path)
        if digest is None:
            digest = self._files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digest

    def key(self, reader: SessionReader, pair: str, size: int, crop_mm: float, lab: StoneLabel,
            link: RawLink) -> str:
        meta = reader.meta
        times = astuple(reader.times[pair]) if reader.times is not None else None
        parts = {
            "code": self._code,
            "frames": [self._file(reader.dir / m / f"{pair}.png") for m in LIGHT_MODES],
            "references": [self._file(reader.dir / "reference" / f"{m}.png") for m in LIGHT_MODES],
            "scale": [meta.pixels_per_mm, meta.pair_interval_ms], "times": times, "window": [crop_mm, size],
            "limits": astuple(pairing_limits(meta.pixels_per_mm, meta.pair_interval_ms)),
            "stone": [lab.stone_id, link.pair, link.position_mm],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str, size: int) -> np.ndarray | None:
        try:
            image = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None
        return image if image.shape == (size, size, 6) and image.dtype == np.uint8 else None

    def put(self, key: str, image: np.ndarray) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, image, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
