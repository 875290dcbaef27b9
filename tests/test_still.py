"""Still stones (§1.2 manual placement, a stone resting when the camera fired): one decision each.

The session is written here with numpy and cv2 only -- not with sorterd.sim's renderer -- at a
scale, light and framing of its own, as another capture program would write it (§7.1, §2.4).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.cli import main

PPM = 22.0  # not the simulator's scale
W, H = 560, 220
SHIFT = 4  # cv2.fillPoly fixed-point bits: sub-pixel outlines
BACK_PANEL = (214, 236, 247)  # a warm backlight panel, BGR
TOP_CARD = (112, 118, 121)  # a grey card under the ring light


def _outline(rng: np.random.Generator, cx: float, cy: float, d_mm: float) -> np.ndarray:
    """A rough, convex-ish stone outline (pixels, fixed point) of about d_mm across."""
    n = int(rng.integers(8, 12))
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.2, 0.2, n)
    r = d_mm / 2 * PPM * rng.uniform(0.9, 1.05, n)
    pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], axis=1)
    return cv2.convexHull((pts * (1 << SHIFT)).astype(np.int32))


def _noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _frames(stones: list[tuple[np.ndarray, tuple[int, int, int], np.ndarray]],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    back = np.full((H, W, 3), BACK_PANEL, np.uint8)
    top = np.full((H, W, 3), TOP_CARD, np.uint8)
    for outline, colour, texture in stones:
        mask = np.zeros((H, W), np.uint8)
        cv2.fillPoly(mask, [outline], 255, lineType=cv2.LINE_AA, shift=SHIFT)
        m = mask[:, :, None] / 255.0
        body = np.clip(np.array(colour, np.float32) + texture, 0, 255)
        back = (back * (1 - m) + body * 0.7 * m).astype(np.uint8)
        top = (top * (1 - m) + body * m).astype(np.uint8)
    return _noise(rng, back, 2.0), _noise(rng, top, 2.0)


def _stone(rng: np.random.Generator, cx: float, cy: float) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    colour = (int(rng.integers(120, 190)), int(rng.integers(60, 110)), int(rng.integers(20, 60)))  # blues, BGR
    texture = cv2.GaussianBlur(rng.normal(0, 25, (H, W, 3)).astype(np.float32), (0, 0), 3)
    return _outline(rng, cx, cy, 3.0), colour, texture


def write_still_session(root: Path, pairs: list[list[int]], places: dict[int, tuple[float, float]],
                        dt_ms: float = 10.0) -> Path:
    """pairs[k]: the stones (numbers) lying in view for pair k; each stone lies still where
    `places` puts it for as long as it is in view.  Named after the first stone new in it."""
    rng = np.random.default_rng(7)
    sdir = root / "images" / "raw" / "2027-02-03_001"
    for sub in ("backlit", "toplit", "reference"):
        (sdir / sub).mkdir(parents=True)
    meta = {"session_id": "2027-02-03_001", "date": "2027-02-03T10:00:00+01:00", "lot_id": "TWEEZERS",
            "pixels_per_mm": PPM, "pair_interval_ms": dt_ms}
    (sdir / "session_meta.json").write_text(json.dumps(meta))
    ref_b, ref_t = _frames([], rng)
    cv2.imwrite(str(sdir / "reference" / "backlit.png"), ref_b)
    cv2.imwrite(str(sdir / "reference" / "toplit.png"), ref_t)
    looks = {n: _stone(rng, *places[n]) for n in places}
    seen: set[int] = set()
    times = []
    for k, stones in enumerate(pairs):
        name = f"S{min(set(stones) - seen):06d}"
        seen |= set(stones)
        back, top = _frames([looks[n] for n in stones], rng)  # the same stone: the same place, fresh noise
        cv2.imwrite(str(sdir / "backlit" / f"{name}.png"), back)
        cv2.imwrite(str(sdir / "toplit" / f"{name}.png"), top)
        t0 = 5_000_000_000 + k * 2_000_000_000  # a stone every 2 s: placed by hand
        times.append({"stone_id": name, "t_trigger_ns": t0, "t_backlit_ns": t0 + 1_000_000,
                      "t_toplit_ns": t0 + 1_000_000 + int(dt_ms * 1e6)})
    (sdir / "frames.jsonl").write_text("".join(json.dumps(t) + "\n" for t in times))
    return sdir


def _replay(session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict], dict, str]:
    out, js = tmp_path / "d.jsonl", tmp_path / "s.json"
    rc = main(["run", "--replay", str(session), "--log-dir", str(tmp_path / "logs"), "--decisions", str(out),
               "--json", str(js), "--no-progress", "--metrics-port", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return rc, rows, json.loads(js.read_text()), capsys.readouterr().err


@pytest.mark.slow
def test_still_stones_replay_to_one_decision_per_stone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Stones 1-3 put down one at a time on (nearly) the same spot; 4 stays in view while 5 is
    # put beside it; 6 alone at the far end.
    places = {1: (200.0, 110.0), 2: (203.0, 108.0), 3: (198.0, 111.0), 4: (150.0, 100.0), 5: (380.0, 115.0),
              6: (470.0, 110.0)}
    session = write_still_session(tmp_path / "data", [[1], [2], [3], [4], [4, 5], [6]], places)
    rc, rows, summary, err = _replay(session, tmp_path, capsys)
    assert rc == 0, err
    assert [r["stone_id"] for r in rows] == [f"S{n:06d}" for n in range(1, 7)]  # each once, none missing
    assert all(r["size_mm"] == pytest.approx(3.0, abs=0.45) for r in rows)
    # At rest: no jet can be timed; the reason says so and the stone takes the default trajectory.
    assert all(r["route"] == "REJECT" and "no jet can be timed" in r["reason"] for r in rows), rows
    assert summary["untimed"] == 6 and summary["objects_decided"] == 6
    assert summary["not_decided"]["already_decided"] == 1  # stone 4, still there in the 5th pair


@pytest.mark.slow
def test_a_replay_that_decides_nothing_exits_3_naming_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every stone cut by the frame's edge: nothing can be measured, and the run says so."""
    places = {1: (20.0, 110.0), 2: (545.0, 100.0)}
    session = write_still_session(tmp_path / "data", [[1], [2]], places)
    rc, rows, summary, err = _replay(session, tmp_path, capsys)
    assert rc == 3
    assert rows == []
    assert summary["not_decided"]["touching_border"] == 2
    assert "the replay decided nothing: decided 0 objects from 2 pairs" in err
    assert "touching border 2" in err
