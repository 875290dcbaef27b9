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
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from sorterd.data.files import write_json_atomic, write_png_atomic
from sorterd.domain import LIGHT_MODES
from sorterd.parts.lights import EDGE_KEYS

STONE_ID = re.compile(r"^S\d{6,}$")


class SessionError(ValueError):
    """A session folder that cannot be used, naming the file and what is wrong."""


@dataclass
class SessionMeta:
    """§2.4 session metadata, plus what replay needs (scale, pair interval)."""

    session_id: str
    timestamp_start: str
    lot_id: str = ""
    lot_description: str = ""
    backlight_exposure_us: float = 1000.0
    ringlight_exposure_us: float = 3000.0
    camera_gain: float = 1.0
    white_balance_matrix: list[list[float]] = field(default_factory=lambda: [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    reference_backlight_intensity: float = 0.0
    reference_check_passed: bool = False
    ambient_temp_c: float | None = None
    notes: str = ""
    pixels_per_mm: float = 0.0
    pair_interval_ms: float = 10.0

    @classmethod
    def from_json(cls, path: Path) -> SessionMeta:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SessionError(f"{path}: missing (every session needs its session_meta.json)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SessionError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise SessionError(f"{path}: must hold a JSON object")
        known = {f.name for f in fields(cls)}
        for key in ("session_id", "pixels_per_mm"):
            if key not in raw:
                raise SessionError(f"{path}: lacks {key!r}")
        ppm = raw["pixels_per_mm"]
        if isinstance(ppm, bool) or not isinstance(ppm, (int, float)) or not 1.0 <= ppm <= 1000.0:
            raise SessionError(f"{path}: pixels_per_mm = {ppm!r}, must be a number in 1..1000")
        raw.setdefault("timestamp_start", "")
        # Extra fields (a real rig's own notes) are kept out of the dataclass, not refused.
        return cls(**{k: v for k, v in raw.items() if k in known})


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
        return sorted(ids["backlit"])

    def _read_times(self) -> dict[str, PairTimes] | None:
        """Recorded times of every pair, or None (then replay spaces pairs evenly)."""
        path = self.dir / "frames.jsonl"
        if not path.exists():
            return None
        times: dict[str, PairTimes] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                strobes = {k: int(rec[k]) for k in EDGE_KEYS if rec.get(k) is not None}
                times[rec["stone_id"]] = PairTimes(int(rec["t_trigger_ns"]), int(rec["t_backlit_ns"]),
                                                   int(rec["t_toplit_ns"]), **strobes)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise SessionError(f"{path}:{lineno}: not a frame-times record ({exc!r}); expected "
                                   '{"stone_id", "t_trigger_ns", "t_backlit_ns", "t_toplit_ns"}') from None
        missing = [s for s in self.stone_ids if s not in times]
        if missing:
            raise SessionError(f"{path}: no times for {', '.join(missing[:5])}")
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
