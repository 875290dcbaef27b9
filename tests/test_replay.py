"""Record a session, replay it: same decisions bit for bit; hand-written sessions; bad sessions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.cli import main
from sorterd.data.session import SessionError, SessionMeta, SessionReader, SessionWriter
from sorterd.sim.appearance import make_stone_look
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.stones import StoneSpec


def decisions(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["stone_id"])


@pytest.mark.slow
def test_recorded_session_replays_to_identical_decisions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["run", "--sim", "--stones", "50", "--seed", "6", "--log-dir", str(tmp_path / "logs"),
                 "--record", str(data), "--decisions", str(tmp_path / "live.jsonl"), "--no-progress",
                 "--metrics-port", "0"]) == 0
    [session] = list((data / "images" / "raw").iterdir())
    reader = SessionReader(session)
    assert reader.meta.pixels_per_mm == 20.0 and reader.times is not None
    assert main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"),
                 "--decisions", str(tmp_path / "replay.jsonl"), "--no-progress", "--metrics-port", "0"]) == 0
    live, replay = decisions(tmp_path / "live.jsonl"), decisions(tmp_path / "replay.jsonl")
    assert len(live) >= 48
    # Same stones, same probabilities (exact floats), same bins. Only the route
    # may differ: replay drives no valves.
    for a, b in zip(live, replay, strict=True):
        a.pop("route"), b.pop("route")
        assert a == b


def _stone(sid: int, color: str, clarity: str, size: float, rng: np.random.Generator) -> StoneSpec:
    outline, size, length, look = make_stone_look(color, clarity, size, rng)
    return StoneSpec(sid, color, clarity, outline, size, length, look, 400.0, 0, 5.0)


def write_hand_session(root: Path, ppm: float = 15.0, w: int = 420, h: int = 150) -> Path:
    """A session as a person with a different camera would write it: no frame times."""
    optics = Optics(width_px=w, height_px=h, px_per_mm=ppm)
    rng = np.random.default_rng(0)
    meta = SessionMeta("2026-11-20_001", "2026-11-20T09:30:00+07:00", lot_id="LOT-HAND", pixels_per_mm=ppm,
                       pair_interval_ms=10.0)
    writer = SessionWriter(root, meta)
    for mode in ("backlit", "toplit"):
        writer.write_reference(mode, render_reference(mode, optics, rng))
    classes = [("blue", "transparent"), ("inky", "opaque"), ("light", "translucent")]
    for i, (color, clarity) in enumerate(classes):
        s = _stone(i, color, clarity, 3.0, rng)
        writer.write_pair(f"S{i + 1:06d}", render_frame("backlit", [(s, 10.0, 5.0)], optics, rng),
                          render_frame("toplit", [(s, 14.0, 5.0)], optics, rng))
    return writer.dir


@pytest.mark.slow
def test_hand_written_session_replays(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path / "data")
    out = tmp_path / "d.jsonl"
    assert main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"), "--decisions", str(out),
                 "--no-progress", "--metrics-port", "0"]) == 0
    got = decisions(out)
    assert [(r["color"], r["clarity"]) for r in got] == [("blue", "transparent"), ("inky", "opaque"),
                                                          ("light", "translucent")]
    assert all(r["size_mm"] == pytest.approx(3.0, abs=0.35) for r in got)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path)
    (session / "toplit" / "S000002.png").write_bytes(b"not a png")
    reader = SessionReader(session)
    with pytest.raises(SessionError, match=r"toplit/S000002.png: not a readable image"):
        reader.read_pair("S000002")


def test_missing_half_of_a_pair_is_named(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path)
    (session / "backlit" / "S000003.png").unlink()
    with pytest.raises(SessionError, match=r"frame pairs incomplete, missing backlit/S000003.png"):
        SessionReader(session)


def test_bad_meta_and_times(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path)
    (session / "frames.jsonl").write_text('{"stone_id": "S000001", "t_trigger_ns": 1}\n')
    with pytest.raises(SessionError, match=r"frames.jsonl:1: not a frame-times record"):
        SessionReader(session)
    (session / "frames.jsonl").unlink()
    meta = json.loads((session / "session_meta.json").read_text())
    meta["pixels_per_mm"] = "fifteen"
    (session / "session_meta.json").write_text(json.dumps(meta))
    with pytest.raises(SessionError, match=r"pixels_per_mm = 'fifteen', must be a number"):
        SessionReader(session)


def test_wrong_image_size_is_refused(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path)
    cv2.imwrite(str(session / "backlit" / "S000001.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SessionError, match=r"backlit/S000001.png: 10x10, but the session's reference frames are 420x150"):
        SessionReader(session).read_pair("S000001")


def test_replay_cli_reports_bad_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--replay", str(tmp_path / "nope"), "--log-dir", str(tmp_path), "--no-progress"]) == 3
    assert "not a session folder" in capsys.readouterr().err
