"""Record a session, replay it: same decisions bit for bit; hand-written sessions; bad sessions."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.cli import main
from sorterd.data.session import SessionError, SessionMeta, SessionReader, SessionWriter, pair_stone_ids, stone_order
from sorterd.sim.appearance import make_stone_look
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.stones import StoneSpec
from sorterd.sorting.record import DecisionsFile, StoneRow, read_rows


def decisions(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["stone_id"])


@pytest.mark.slow
def test_recorded_session_replays_to_identical_decisions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["run", "--sim", "--stones", "50", "--seed", "6", "--log-dir", str(tmp_path / "logs"),
                 "--record", str(data), "--decisions", str(tmp_path / "live.jsonl"), "--no-progress",
                 "--metrics-port", "0", "--json", str(tmp_path / "live.json")]) == 0
    # A deadline miss sends its stone to REJECT live, which a dry replay cannot repeat.
    assert json.loads((tmp_path / "live.json").read_text())["deadline_misses"] == 0, "live run overloaded"
    [session] = list((data / "images" / "raw").iterdir())
    reader = SessionReader(session)
    assert reader.meta.pixels_per_mm == 20.0 and reader.times is not None
    assert main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"),
                 "--decisions", str(tmp_path / "replay.jsonl"), "--no-progress", "--metrics-port", "0"]) == 0
    live = decisions(tmp_path / "live.jsonl")
    assert len(live) >= 48
    # Same stones under the same ids, same probabilities (exact floats), same bins and
    # routes, in the same order: a plain file comparison.
    assert filecmp.cmp(tmp_path / "live.jsonl", tmp_path / "replay.jsonl", shallow=False)
    assert [r["stone_id"] for r in map(json.loads, (tmp_path / "live.jsonl").read_text().splitlines())] == \
        sorted((r["stone_id"] for r in live), key=stone_order)


@pytest.mark.slow
def test_replay_after_an_unreadable_frame_keeps_the_recorded_ids(tmp_path: Path) -> None:
    """One corrupt frame: every other stone keeps the id it was recorded under, so replayed
    rows still join to the live rows, their images and labels; nothing is counted lost."""
    data = tmp_path / "data"
    assert main(["run", "--sim", "--stones", "60", "--seed", "6", "--log-dir", str(tmp_path / "logs"),
                 "--record", str(data), "--decisions", str(tmp_path / "live.jsonl"), "--no-progress",
                 "--metrics-port", "0"]) == 0
    [session] = list((data / "images" / "raw").iterdir())
    names = SessionReader(session).stone_ids
    bad, after = names[len(names) // 3], names[len(names) // 3 + 1]
    (session / "toplit" / f"{bad}.png").write_bytes(b"\x89PNG truncated")
    out, summary = tmp_path / "replay.jsonl", tmp_path / "replay.json"
    assert main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"), "--decisions", str(out),
                 "--json", str(summary), "--no-progress", "--metrics-port", "0"]) == 0
    live = {r["stone_id"]: r for r in decisions(tmp_path / "live.jsonl")}
    in_bad_pair = {sid for sid in live if stone_order(bad) <= stone_order(sid) < stone_order(after)}
    got = decisions(out)
    recorded = [r for r in got if "." not in r["stone_id"]]
    assert {r["stone_id"] for r in recorded} == set(live) - in_bad_pair
    for r in recorded:  # the same stone, not a neighbour under its id
        want = live[r["stone_id"]]
        assert (r["p_color"], r["p_clarity"], r["size_mm"]) == (want["p_color"], want["p_clarity"], want["size_mm"])
    # A stone of the unreadable pair seen first in a later one: an id no recording uses.
    assert len(got) - len(recorded) <= len(in_bad_pair)
    s = json.loads(summary.read_text())
    assert s["unreadable_pairs"] == 1 and s["camera_failures"] == 0 and s["camera_gap_triggers"] == 0
    rows = read_rows(Path(s["batch_dir"]) / "stones.db")
    assert sorted(r["stone_id"] for r in rows) == sorted(r["stone_id"] for r in got)


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
    with pytest.raises(SessionError, match=r"pixels_per_mm = 'fifteen' has the wrong type: expected number"):
        SessionReader(session)


def test_wrong_image_size_is_refused(tmp_path: Path) -> None:
    session = write_hand_session(tmp_path)
    cv2.imwrite(str(session / "backlit" / "S000001.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SessionError, match=r"backlit/S000001.png: 10x10, but the session's reference frames are 420x150"):
        SessionReader(session).read_pair("S000001")


def test_replay_cli_reports_bad_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--replay", str(tmp_path / "nope"), "--log-dir", str(tmp_path), "--no-progress"]) == 3
    assert "not a session folder" in capsys.readouterr().err


# -- hostile recorded files: one line naming the file (and line), exit 3 -------------------

def _replay_cli(session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    rc = main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"), "--no-progress",
               "--metrics-port", "0", *extra])
    return rc, capsys.readouterr().err


TIMES = '{"stone_id": "S000001", "t_trigger_ns": 1000, "t_backlit_ns": 2000, "t_toplit_ns": 10002000'


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"frames.jsonl:1: not a frame-times record \(not UTF-8 text, byte \d+\)"),
    (b"[1, 2]\n", r"frames.jsonl:1: not a frame-times record \(an array, not an object\)"),
    (b"\nnull\n", r"frames.jsonl:2: not a frame-times record \(null, not an object\)"),
    (b"42\n", r"frames.jsonl:1: not a frame-times record \(a number, not an object\)"),
    (b'"S000001"\n', r"frames.jsonl:1: not a frame-times record \(a string, not an object\)"),
    (b"garbage\n", r"frames.jsonl:1: not a frame-times record \(not JSON: "),
    (b'{"stone_id": "S000001", "t_trigger_ns": 1000, "t_backlit_ns": 2000}\n', r"frames.jsonl:1: .*lacks 't_toplit_ns'"),
    ((TIMES + ', "t_exposure": 5}\n').encode(), r"frames.jsonl:1: .*unknown key 't_exposure'"),
    (TIMES.replace("1000,", "true,", 1).encode() + b"}\n", r"t_trigger_ns = True must be an integer in 0 \.\. 2\*\*63-1"),
    (TIMES.replace("2000,", "2000.5,", 1).encode() + b"}\n", r"t_backlit_ns = 2000.5 must be an integer"),
    (TIMES.replace("1000,", "-5,", 1).encode() + b"}\n", r"t_trigger_ns = -5 must be an integer in 0"),
    (TIMES.replace("1000,", '"1000",', 1).encode() + b"}\n", r"t_trigger_ns = '1000' must be an integer"),
    (TIMES.replace('"S000001"', "7").encode() + b"}\n", r"stone_id = 7 must be the pair's name"),
    (TIMES.replace("10002000", "1000").encode() + b"}\n", r"frames.jsonl:1: .*out of order: needs t_trigger_ns <= "),
    ((TIMES + "}\n" + TIMES + "}\n").encode(), r"frames.jsonl:2: a second record for S000001"),
])
def test_hostile_frames_jsonl_is_one_line_and_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     content: bytes, message: str) -> None:
    session = write_hand_session(tmp_path / "data")
    (session / "frames.jsonl").write_bytes(content)
    rc, err = _replay_cli(session, tmp_path, capsys)
    assert rc == 3, err
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("sorterd: cannot replay")]
    assert re.search(message, line), line


def test_frames_jsonl_in_recording_order_and_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    session = write_hand_session(tmp_path / "data")
    lines = [f'{{"stone_id": "S{i:06d}", "t_trigger_ns": {t}, "t_backlit_ns": {t}, "t_toplit_ns": {t + 10**7}}}'
             for i, t in ((1, 10**9), (2, 3 * 10**9), (3, 2 * 10**9))]
    (session / "frames.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = _replay_cli(session, tmp_path, capsys)
    assert rc == 3 and "S000003 was triggered at 2000000000, before S000002" in err
    (session / "frames.jsonl").unlink()
    (session / "frames.jsonl").mkdir()  # a folder in its place
    rc, err = _replay_cli(session, tmp_path, capsys)
    assert rc == 3 and re.search(r"frames.jsonl: cannot read", err), err


def _meta_with(session: Path, **changes: object) -> None:
    meta = json.loads((session / "session_meta.json").read_text())
    (session / "session_meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize(("changes", "message"), [
    ({"pair_interval_ms": 0}, r"pair_interval_ms = 0.0 is too small: must be >= 1.0 \(allowed range 1.0 .. 50.0\)"),
    ({"pair_interval_ms": -3}, r"pair_interval_ms = -3.0 is too small: must be >= 1.0 \(allowed range 1.0 .. 50.0\)"),
    ({"pair_interval_ms": 1e9}, r"pair_interval_ms = 1000000000.0 is too large: must be <= 50.0"),
    ({"pair_interval_ms": "10"}, r"pair_interval_ms = '10' has the wrong type: expected number"),
    ({"pair_interval_ms": float("nan")}, r"pair_interval_ms = nan must be a finite number"),
    ({"pixels_per_mm": float("inf")}, r"pixels_per_mm = inf must be a finite number"),
    ({"session_id": 7}, r"session_id = 7 has the wrong type: expected string"),
    ({"reference_check_passed": "yes"}, r"reference_check_passed = 'yes' has the wrong type: expected true/false"),
    ({"white_balance_matrix": [[1, 0], [0, 1]]}, r"white_balance_matrix = .* must be 3 rows of 3 finite numbers"),
    ({"ambient_temp_c": 900}, r"ambient_temp_c = 900.0 is too large: must be <= 100.0"),
    ({"pair_interval_ms": 0, "camera_gain": -1}, r"camera_gain = -1.0 is too small.*; pair_interval_ms = 0.0 is too small"),
])
def test_absurd_session_meta_is_refused_with_the_allowed_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               changes: dict[str, object], message: str) -> None:
    session = write_hand_session(tmp_path / "data")
    _meta_with(session, **changes)
    rc, err = _replay_cli(session, tmp_path, capsys)
    assert rc == 3, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("sorterd: cannot replay")]
    assert "session_meta.json: " in line and re.search(message, line), line


@pytest.mark.parametrize(("name", "content", "message"), [
    ("session_meta.json", b"\xff\xfe\x00binary", r"session_meta.json: not readable JSON"),
    ("session_meta.json", b"[1, 2, 3]", r"session_meta.json: must hold a JSON object, not an array"),
    ("session_meta.json", b"null", r"session_meta.json: must hold a JSON object, not null"),
    ("reference/backlit.png", b"\x00\x01 not a png", r"reference/backlit.png: not a readable image"),
    ("reference/toplit.png", b"", r"reference/toplit.png: not a readable image"),
])
def test_hostile_meta_and_references_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            name: str, content: bytes, message: str) -> None:
    session = write_hand_session(tmp_path / "data")
    (session / name).write_bytes(content)
    rc, err = _replay_cli(session, tmp_path, capsys)
    assert rc == 3 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_extra_meta_fields_are_kept_out_not_refused(tmp_path: Path) -> None:
    """A rig's own notes (or the simulator's `sim` table) ride along in session_meta.json."""
    session = write_hand_session(tmp_path / "data")
    _meta_with(session, sim={"seed": 3}, operator="Duke")
    assert SessionReader(session).meta.pixels_per_mm == 15.0


# -- replay identity: the recorded ids, an unreadable pair skipped and counted ---------------

def test_pair_stone_ids_follow_the_recording() -> None:
    # --record named the pair after its first new stone and numbered the others on.
    assert pair_stone_ids("S000011", "S000013", 2) == ["S000011", "S000012"]
    assert pair_stone_ids("S000011", "S000013", 1) == ["S000011"]
    # More new stones than were recorded in the pair (one of an unreadable pair seen first
    # here): suffixed ids no recording uses, sorting right after the pair's own.
    assert pair_stone_ids("S000011", "S000012", 3) == ["S000011", "S000011.1", "S000011.2"]
    assert pair_stone_ids("S999999", None, 2) == ["S999999", "S1000000"]
    assert pair_stone_ids("stone_a", "stone_b", 2) == ["stone_a", "stone_a.1"]
    ids = ["S1000000", "S000011.1", "S999999", "S000012", "S000011", "stone_a"]
    assert sorted(ids, key=stone_order) == ["S000011", "S000011.1", "S000012", "S999999", "S1000000", "stone_a"]


def test_unreadable_frame_is_skipped_counted_and_renumbers_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    session = write_hand_session(tmp_path / "data")
    (session / "toplit" / "S000002.png").write_bytes(b"not a png")
    out, summary = tmp_path / "d.jsonl", tmp_path / "s.json"
    rc, err = _replay_cli(session, tmp_path, capsys, "--decisions", str(out), "--json", str(summary))
    assert rc == 0, err
    assert [r["stone_id"] for r in decisions(out)] == ["S000001", "S000003"]  # the recorded names
    s = json.loads(summary.read_text())
    assert s["unreadable_pairs"] == 1
    assert s["camera_failures"] == 0 and s["camera_gap_triggers"] == 0  # the camera did not fail, no trigger lost
    assert "unreadable recorded pairs (skipped) 1" in err and "triggers in the gap" not in err


def test_decisions_file_is_in_stone_id_order(tmp_path: Path) -> None:
    """Rows finish in completion order (pulses wait for their outcome); the file is in id order."""
    path = tmp_path / "d.jsonl"
    f = DecisionsFile(path, hold=3)
    rows = [_row(f"S{n:06d}") for n in (2, 1, 4, 3, 6, 5, 7)]
    for i in range(0, len(rows), 2):
        f.add(rows[i:i + 2])
    f.close()
    assert [json.loads(ln)["stone_id"] for ln in path.read_text().splitlines()] == [f"S{n:06d}" for n in range(1, 8)]
    assert f.out_of_order == 0


def _row(sid: str) -> StoneRow:
    return StoneRow(sid, 0, 0, 0, 0, 0, 1.0, 1.0, 400.0, 3.0, 3.0, 0, None, None, None, None, None, None, None, None,
                    1.0, "REJECT", "REJECT", "", 0, 0, None, None, None, None, "no pulse", "v", "")
