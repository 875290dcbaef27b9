"""A capture session in the §7.1 raw layout, for recording and replay.

    <data>/images/raw/<session_id>/
        backlit/<stone_id>.png      backlit frame of the pair (lossless, BGR as captured)
        toplit/<stone_id>.png       toplit frame, taken pair_interval_ms later
        reference/backlit.png       the empty channel in each mode (segmentation background)
        reference/toplit.png
        session_meta.json           §2.4 fields + pixels_per_mm (+ pair_interval_ms)
        frames.jsonl                optional: per pair, its recorded trigger and exposure
                                    times (host monotonic ns) -- replay reproduces them

A pair is named after the stone it was captured for (the first new stone in
it).  Real captures and the simulator's sessions use the same layout; a
reader never assumes which made it.
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.configfile import check_value, opt
from sorterd.data.files import write_json_atomic, write_png_atomic
from sorterd.domain import LIGHT_MODES
from sorterd.parts.lights import EDGE_KEYS

STONE_ID = re.compile(r"^S\d{6,}$")


class SessionError(ValueError):
    """A session folder that cannot be used, naming the file and what is wrong."""


@dataclass
class SessionMeta:
    """§2.4 session metadata, plus what replay needs (scale, pair interval).

    Read as strictly as the config: every field's type and bounds (`opt`) are
    checked, and all problems are reported at once.  Fields this class does not
    know (a rig's own notes, the simulator's `sim`) are kept out, not refused."""

    session_id: str = opt("", "§2.4 <YYYY-MM-DD>_<NNN>.")
    timestamp_start: str = opt("", "ISO 8601 start of the session.")
    lot_id: str = opt("", "§2.4 lot id.")
    lot_description: str = opt("", "§2.4 lot description.")
    backlight_exposure_us: float = opt(1000.0, "Backlit exposure.", minval=1.0, maxval=1_000_000.0)
    ringlight_exposure_us: float = opt(3000.0, "Ring-light exposure.", minval=1.0, maxval=1_000_000.0)
    camera_gain: float = opt(1.0, "Camera gain.", minval=0.0, maxval=1000.0)
    white_balance_matrix: list[list[float]] = field(default_factory=lambda: [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    reference_backlight_intensity: float = opt(0.0, "Mean of the empty backlit channel (8-bit).", minval=0.0, maxval=255.0)
    reference_check_passed: bool = opt(False, "The session-start checklist passed.")
    ambient_temp_c: float | None = opt(None, "Ambient temperature.", minval=-50.0, maxval=100.0)
    notes: str = opt("", "Free text.")
    pixels_per_mm: float = opt(0.0, "Image scale of the frames.", minval=1.0, maxval=1000.0)
    # The bounds of lights.pair_interval_ms: a replay pairs its frames with this interval.
    pair_interval_ms: float = opt(10.0, "Backlit frame at t0, toplit frame at t0 + this.", minval=1.0, maxval=50.0)

    @classmethod
    def from_json(cls, path: Path) -> SessionMeta:
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise SessionError(f"{path}: missing (every session needs its session_meta.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SessionError(f"{path}: not readable JSON ({exc})") from None
        return cls.from_mapping(raw, str(path))

    @classmethod
    def from_mapping(cls, raw: Any, where: str) -> SessionMeta:
        """The same strict check as `from_json`, of a decoded JSON value; errors start with `where`."""
        if not isinstance(raw, dict):
            raise SessionError(f"{where}: must hold a JSON object, not {_json_kind(raw)}")
        problems = [f"lacks {key!r}" for key in ("session_id", "pixels_per_mm") if key not in raw]
        values = _checked_fields(cls, raw, problems)
        if problems:
            raise SessionError(f"{where}: " + "; ".join(problems))
        # Extra fields (a real rig's own notes) are kept out of the dataclass, not refused.
        return cls(**values)


def _checked_fields(cls: type, raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The known fields of `raw`, each checked against its type and `opt` bounds."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        if f.name == "white_balance_matrix":
            value, err = raw[f.name], _matrix_problem(raw[f.name])
        else:
            value, err = check_value(raw[f.name], hints[f.name], f.metadata, f.name)
        if err:
            problems.append(err)
        else:
            values[f.name] = value
    return values


def _matrix_problem(value: Any) -> str | None:
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(row, list) and len(row) == 3 for row in value)
          and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and -10.0 <= v <= 10.0
                  for row in value for v in row))
    return None if ok else f"white_balance_matrix = {value!r} must be 3 rows of 3 finite numbers in -10 .. 10"


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), "null")


def new_session_id(data_dir: Path, day: datetime | None = None) -> str:
    """§7.2: <YYYY-MM-DD>_<NNN>, the next free number of that day."""
    day_s = (day or datetime.now()).strftime("%Y-%m-%d")
    raw = data_dir / "images" / "raw"
    taken = {p.name for p in raw.glob(f"{day_s}_*")} if raw.exists() else set()
    n = 1
    while f"{day_s}_{n:03d}" in taken:
        n += 1
    return f"{day_s}_{n:03d}"


class SessionWriter:
    """Writes one session; call from a writer thread, not the event loop."""

    def __init__(self, data_dir: Path, meta: SessionMeta) -> None:
        self.meta = meta
        self.dir = data_dir / "images" / "raw" / meta.session_id
        for sub in (*LIGHT_MODES, "reference"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.write_meta()

    def write_meta(self) -> None:
        write_json_atomic(self.dir / "session_meta.json", asdict(self.meta))

    def write_reference(self, mode: str, image: np.ndarray) -> None:
        write_png_atomic(self.dir / "reference" / f"{mode}.png", image)

    def write_pair(self, stone_id: str, backlit: np.ndarray, toplit: np.ndarray, times: PairTimes | None = None) -> None:
        write_png_atomic(self.dir / "backlit" / f"{stone_id}.png", backlit)
        write_png_atomic(self.dir / "toplit" / f"{stone_id}.png", toplit)
        if times is not None:
            with open(self.dir / "frames.jsonl", "a") as fh:
                fh.write(json.dumps({"stone_id": stone_id, **asdict(times)}) + "\n")


@dataclass(frozen=True)
class PairTimes:
    """When a pair was taken (host monotonic ns of the recording run)."""

    t_trigger_ns: int
    t_backlit_ns: int
    t_toplit_ns: int
    # The strobes' actual edges, when the lights reported them.
    backlit_on_ns: int | None = None
    backlit_off_ns: int | None = None
    toplit_on_ns: int | None = None
    toplit_off_ns: int | None = None


def read_image(path: Path) -> np.ndarray:
    if not path.exists():
        raise SessionError(f"{path}: missing")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SessionError(f"{path}: not a readable image (corrupt or not PNG/JPEG)")
    return image


class SessionReader:
    """A recorded session folder: its meta, references and frame pairs in order."""

    def __init__(self, session_dir: Path) -> None:
        self.dir = session_dir
        if not session_dir.is_dir():
            raise SessionError(f"{session_dir}: not a session folder")
        self.meta = SessionMeta.from_json(session_dir / "session_meta.json")
        self.references = {m: read_image(session_dir / "reference" / f"{m}.png") for m in LIGHT_MODES}
        shapes = {m: r.shape for m, r in self.references.items()}
        if shapes["backlit"] != shapes["toplit"]:
            raise SessionError(f"{session_dir}/reference: backlit {shapes['backlit']} and toplit "
                               f"{shapes['toplit']} frames differ in size")
        self.stone_ids = self._pair_ids()
        self.times = self._read_times()

    def _pair_ids(self) -> list[str]:
        ids = {m: {p.stem for p in (self.dir / m).glob("*.png")} for m in LIGHT_MODES}
        only_b, only_t = ids["backlit"] - ids["toplit"], ids["toplit"] - ids["backlit"]
        if only_b or only_t:
            missing = sorted(f"toplit/{s}.png" for s in only_b) + sorted(f"backlit/{s}.png" for s in only_t)
            raise SessionError(f"{self.dir}: frame pairs incomplete, missing {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if not ids["backlit"]:
            raise SessionError(f"{self.dir}: no frame pairs in backlit/ and toplit/")
        return sorted(ids["backlit"], key=stone_order)

    def _read_times(self) -> dict[str, PairTimes] | None:
        """Recorded times of every pair, or None (then replay spaces pairs evenly)."""
        path = self.dir / "frames.jsonl"
        if not path.exists():
            return None
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            raise SessionError(f"{path}: cannot read ({exc})") from None
        times: dict[str, PairTimes] = {}
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                sid, rec = parse_times_line(line, f"{path}:{lineno}")
                if sid in times:
                    raise SessionError(f"{path}:{lineno}: a second record for {sid}")
                times[sid] = rec
        missing = [s for s in self.stone_ids if s not in times]
        if missing:
            raise SessionError(f"{path}: no times for {', '.join(missing[:5])}")
        _check_recording_order(self.stone_ids, times, path)
        return times

    def read_pair(self, stone_id: str) -> tuple[np.ndarray, np.ndarray]:
        b = read_image(self.dir / "backlit" / f"{stone_id}.png")
        t = read_image(self.dir / "toplit" / f"{stone_id}.png")
        ref_shape = self.references["backlit"].shape
        for mode, img in (("backlit", b), ("toplit", t)):
            if img.shape != ref_shape:
                raise SessionError(f"{self.dir}/{mode}/{stone_id}.png: {img.shape[1]}x{img.shape[0]}, "
                                   f"but the session's reference frames are {ref_shape[1]}x{ref_shape[0]}")
        return b, t


TIME_KEYS = ("t_trigger_ns", "t_backlit_ns", "t_toplit_ns")
MAX_PAIR_SPAN_NS = 1_000_000_000  # a pair's toplit frame comes pair_interval_ms (<= 50 ms) after its backlit one
TIMES_FORMAT = ('{"stone_id": "<pair>", "t_trigger_ns": int, "t_backlit_ns": int, "t_toplit_ns": int'
                + "".join(f', "{k}": int or null' for k in EDGE_KEYS) + "}")


def parse_times_line(line: bytes, where: str) -> tuple[str, PairTimes]:
    """One frames.jsonl line: (pair name, its times); SessionError naming `where` (file:line)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _times_error(where, f"not UTF-8 text, byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise _times_error(where, f"not JSON: {exc.msg}") from None
    if not isinstance(rec, dict):
        raise _times_error(where, f"{_json_kind(rec)}, not an object")
    problems = _times_problems(rec)
    if problems:
        raise _times_error(where, "; ".join(problems))
    edges = {k: rec[k] for k in EDGE_KEYS if rec.get(k) is not None}
    times = PairTimes(rec["t_trigger_ns"], rec["t_backlit_ns"], rec["t_toplit_ns"], **edges)
    if not times.t_trigger_ns <= times.t_backlit_ns < times.t_toplit_ns <= times.t_backlit_ns + MAX_PAIR_SPAN_NS:
        raise _times_error(where, f"times {times.t_trigger_ns}, {times.t_backlit_ns}, {times.t_toplit_ns} out of "
                                  f"order: needs t_trigger_ns <= t_backlit_ns < t_toplit_ns <= t_backlit_ns + "
                                  f"{MAX_PAIR_SPAN_NS}")
    return rec["stone_id"], times


def _times_error(where: str, what: str) -> SessionError:
    return SessionError(f"{where}: not a frame-times record ({what}); expected {TIMES_FORMAT}")


def _times_problems(rec: dict[str, Any]) -> list[str]:
    known = ("stone_id", *TIME_KEYS, *EDGE_KEYS)
    problems = [f"unknown key {k!r}" for k in rec if k not in known]
    sid = rec.get("stone_id")
    if not isinstance(sid, str) or not sid:
        problems.append(f"stone_id = {sid!r} must be the pair's name (a non-empty string)")
    for key in (*TIME_KEYS, *EDGE_KEYS):
        value = rec.get(key)
        if value is None and key in EDGE_KEYS:
            continue
        if key not in rec:
            problems.append(f"lacks {key!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            problems.append(f"{key} = {value!r} must be an integer in 0 .. 2**63-1 (host monotonic ns)")
    return problems


def _check_recording_order(ids: list[str], times: dict[str, PairTimes], path: Path) -> None:
    """Pairs are named in capture order: their triggers never go back in time."""
    for prev, sid in zip(ids, ids[1:], strict=False):
        if times[sid].t_trigger_ns < times[prev].t_trigger_ns:
            raise SessionError(f"{path}: {sid} was triggered at {times[sid].t_trigger_ns}, before {prev} "
                               f"({times[prev].t_trigger_ns}): pairs must be named in recording order")


_NUMBERED = re.compile(r"^S(\d+)(.*)$")


def stone_order(stone_id: str) -> tuple[int, int, str]:
    """Sort key of stone ids and pair names: by number (S999999 before S1000000), a
    suffix (S000011.1, a replay's extra stone) after its base; other names last."""
    m = _NUMBERED.match(stone_id)
    return (0, int(m.group(1)), m.group(2)) if m else (1, 0, stone_id)


PAIR_IDS_MAX = 64  # no pair holds more new stones than this (the tracker's memory)


def pair_stone_ids(name: str, next_name: str | None, n: int) -> list[str]:
    """The ids of the n new stones a replay finds in recorded pair `name`.

    `run --record` named each pair after its first new stone and numbered the
    others on (S000011, S000012, ...) up to the next pair's name: a replay gives
    them the same ids in the same (segmentation) order.  Stones beyond that
    range (a stone of an unreadable pair seen first here) get the pair's name
    and a suffix, S000011.1, S000011.2, ..., which no recording uses."""
    m = _NUMBERED.match(name)
    if m and not m.group(2):
        width, first = len(m.group(1)), int(m.group(1))
        n_next = _NUMBERED.match(next_name) if next_name is not None else None
        end = int(n_next.group(1)) if n_next else first + PAIR_IDS_MAX
        room = [f"S{k:0{width}d}" for k in range(first, min(end, first + PAIR_IDS_MAX))]
    else:
        room = [name]  # a hand-written name: the first stone gets it
    ids = room[:n]
    return ids + [f"{name}.{k}" for k in range(1, n - len(ids) + 1)]
