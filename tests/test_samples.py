"""The trainer's input for a stone is the sorter's, cut from the same raw frames (sorterd.data.samples).

The sessions here are drawn by hand with cv2 (not by our simulator) at 15, 40 and 80 px/mm, each
with its own light levels: a first pair with three stones (one of them lying still), a second
pair where that still stone is seen again beside one new stone.  The sorter's side is the live
Pipeline itself, replaying each session through the replay camera with a model that keeps what
it was given; the trainer's side is `load_samples`.  They must agree bit for bit, and every
stone the loader cuts must be the labelled one (each stone has its own toplit grey).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.clock import VirtualClock
from sorterd.data.bundle import OodSpec
from sorterd.data.dataset import DatasetError, load_crops, open_dataset
from sorterd.data.samples import SampleReport, dedupe, load_samples
from sorterd.metrics import Metrics
from sorterd.parts import Parts
from sorterd.parts.camera.replay import ReplayCamera, ReplaySource, ReplayTrigger
from sorterd.parts.inference import Prediction
from sorterd.sorting.pipeline import Pipeline
from sorterd.sorting.record import Recorder
from tests.test_pipeline_fakes import FakeLights, FakeValves

SIZE, CROP_MM = 128, 6.4
W_MM, H_MM, Y_MM = 28.0, 8.0, 4.0
DT_MS = 10.0
# session -> (px/mm, backlight level, grey-card level, first stone number)
SESSIONS = {"s15": (15.0, 225, 70, 101), "s40": (40.0, 190, 90, 201), "s80": (80.0, 245, 60, 301)}
STONE_BACK = 50
# Each stone: (number offset, pair offset, backlit x, toplit x, size mm, toplit grey).  Pair 0 holds
# stones 0-2 (stone 1 still: 0 mm moved); pair 1 (named after stone 3) holds stone 1 again, still,
# and the new stone 3.  Moving stones go 3 mm in 10 ms (300 mm/s).
STONES = [(0, 0, 4.0, 7.0, 2.4, 150), (1, 0, 14.0, 14.0, 2.0, 185), (2, 0, 18.0, 21.0, 2.8, 215)]
PAIR1 = [(1, 1, 14.0, 14.0, 2.0, 185), (3, 1, 5.0, 8.0, 2.2, 235)]


def _draw(ref: np.ndarray, ppm: float, stones: list[tuple[float, float, int]]) -> np.ndarray:
    """Discs (x mm, size mm, grey) on a copy of ref, anti-aliased at 1/16 px."""
    img = ref.copy()
    for x, size, grey in stones:
        cv2.circle(img, (round(x * ppm * 16), round(Y_MM * ppm * 16)), round(size / 2 * ppm * 16),
                   (grey, grey, grey), -1, cv2.LINE_AA, shift=4)
    return img


def _noisy(level: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(level, 2.0, (*shape, 3)), 0, 255).astype(np.uint8)


def write_session(root: Path, sid: str) -> dict[str, tuple[float, float, int]]:
    """One hand-drawn session in the §7.1 raw layout; stone id -> (toplit x, y mm, toplit grey)."""
    ppm, back, top, first = SESSIONS[sid]
    rng = np.random.default_rng(first)
    folder = root / "images" / "raw" / sid
    for sub in ("backlit", "toplit", "reference"):
        (folder / sub).mkdir(parents=True)
    shape = (round(H_MM * ppm), round(W_MM * ppm))
    refs = {"backlit": _noisy(back, shape, rng), "toplit": _noisy(top, shape, rng)}
    for mode, ref in refs.items():
        cv2.imwrite(str(folder / "reference" / f"{mode}.png"), ref)
    (folder / "session_meta.json").write_text(json.dumps({"session_id": sid, "pixels_per_mm": ppm,
                                                          "pair_interval_ms": DT_MS, "lot_id": "LOT-HAND"}))
    truth: dict[str, tuple[float, float, int]] = {}
    times = []
    for k, stones in enumerate((STONES, PAIR1)):
        name = f"S{first + (3 if k else 0):06d}"
        # Fresh sensor noise on every frame: the reference is not the frame's background.
        b = _draw(_noisy(back, shape, rng), ppm, [(bx, size, STONE_BACK) for _, _, bx, _, size, _ in stones])
        t = _draw(_noisy(top, shape, rng), ppm, [(tx, size, grey) for _, _, _, tx, size, grey in stones])
        cv2.imwrite(str(folder / "backlit" / f"{name}.png"), b)
        cv2.imwrite(str(folder / "toplit" / f"{name}.png"), t)
        t0 = 1_000_000_000 + k * 200_000_000
        times.append({"stone_id": name, "t_trigger_ns": t0 - 2_000_000, "t_backlit_ns": t0,
                      "t_toplit_ns": t0 + int(DT_MS * 1e6)})
        for off, _, _, tx, _, grey in stones:
            truth.setdefault(f"S{first + off:06d}", (tx, Y_MM, grey))
    (folder / "frames.jsonl").write_text("".join(json.dumps(r) + "\n" for r in times))
    return truth


def write_dataset(root: Path) -> dict[str, tuple[float, float, int]]:
    """Three hand-drawn sessions, processed crops for every stone, labels linking them in every
    way the loader knows; returns every stone's truth."""
    truth: dict[str, tuple[float, float, int]] = {}
    for sid in SESSIONS:
        truth |= write_session(root, sid)
    lines = []
    for sid, (_, _, _, first) in SESSIONS.items():
        ids = [f"S{first + k:06d}" for k in range(4)]
        links: list[dict[str, Any]] = [
            {"raw_pair": ids[0]},  # position and pair
            {},  # position, pair found by its id range
            {"no_position": True},  # neither: by order (pair 0's three objects are all its own)
            {"raw_pair": ids[3]},  # position, in the pair where the still stone is seen again
        ]
        for stone_id, link in zip(ids, links, strict=True):
            rec: dict[str, Any] = {"stone_id": stone_id, "color": "blue", "clarity": "transparent",
                                   "session_id": sid, "lot_id": "LOT-HAND"}
            if not link.pop("no_position", False):
                x, y, _ = truth[stone_id]
                rec |= {"raw_x_mm": x + 0.1, "raw_y_mm": y - 0.1}  # another tool's centroid, not ours
            lines.append(rec | link)
    lines += [
        # In pair S000204's id range, no position: that pair also shows a stone from before.
        {"stone_id": "S000205", "session_id": "s40"},
        # A position where nothing lies.
        {"stone_id": "S000206", "session_id": "s40", "raw_pair": "S000204", "raw_x_mm": 25.0, "raw_y_mm": 4.0},
        # A pair the session does not have.
        {"stone_id": "S000207", "session_id": "s40", "raw_pair": "S000299", "raw_x_mm": 7.0, "raw_y_mm": 4.0},
        # No session: its processed crop.
        {"stone_id": "P000001", "session_id": "elsewhere"},
    ]
    for rec in lines[-4:]:
        rec |= {"color": "inky", "clarity": "opaque", "lot_id": "LOT-HAND"}
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _write_processed(root, [r["stone_id"] for r in lines])
    return truth


def _write_processed(root: Path, ids: list[str]) -> None:
    """A plain 80 x 80 crop (one dark disc) per stone: what a crop-only tool would write."""
    for mode, level in (("backlit", 200), ("toplit", 80)):
        folder = root / "images" / "processed" / mode
        folder.mkdir(parents=True, exist_ok=True)
        for k, stone_id in enumerate(ids):
            img = np.full((80, 80, 3), level, np.uint8)
            cv2.circle(img, (40, 40), 20 + k % 5, (30, 30, 30), -1)
            cv2.imwrite(str(folder / f"{stone_id}.png"), img)


# -- the sorter's side: the live pipeline on a replay of the session --------------------------


class _Manifest:
    size = (SIZE, SIZE)
    crop_mm = CROP_MM
    onnx_sha256 = "e" * 64
    color_classes = ("blue", "light", "inky")
    clarity_classes = ("transparent", "translucent", "opaque")
    ood: OodSpec | None = None


class _KeepingModel:
    version = "keeping-1"
    manifest = _Manifest()

    def predict_halves(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        return [Prediction(np.array([0.9, 0.05, 0.05]), np.array([0.9, 0.05, 0.05])) for _ in crops], 0.001


class _KeepingPipeline(Pipeline):
    """The live pipeline, keeping each decided stone's crop halves as it hands them on."""

    kept: dict[str, tuple[np.ndarray, np.ndarray]]

    def _save_images(self, sid: str, pair: Any, crop: tuple[np.ndarray, np.ndarray], flagged: bool) -> None:
        self.kept[sid] = crop
        super()._save_images(sid, pair, crop, flagged)


def sorter_inputs(session: Path, batch: Path) -> dict[str, np.ndarray]:
    """stone id -> the 6-channel input the live sorter made for it, replaying `session`."""
    cfg = load_config(config.sim_config_path(), {"metrics": {"enabled": False}})
    clock = VirtualClock()
    loop = clock.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))

    async def main() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        source = ReplaySource(session, clock, 200.0)
        parts = Parts(camera=ReplayCamera(source), lights=FakeLights(), trigger=ReplayTrigger(source),
                      valves=FakeValves(clock))  # type: ignore[arg-type]
        batch.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(batch, 0.01, 100, cfg.record.thumbnail_px)
        pipeline = _KeepingPipeline(cfg, clock, parts, _KeepingModel(), recorder, Metrics())  # type: ignore[arg-type]
        pipeline.kept = {}
        try:
            await asyncio.wait_for(pipeline.run(), 30.0)
        finally:
            recorder.close()
        return pipeline.kept

    try:
        kept = loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    return {sid: np.concatenate([b[:, :, ::-1], t[:, :, ::-1]], axis=2) for sid, (b, t) in kept.items()}


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[float, float, int]]]:
    root = tmp_path_factory.mktemp("hand")
    return root, write_dataset(root)


def test_the_trainers_input_is_the_live_sorters_bit_for_bit(hand: tuple[Path, dict], tmp_path: Path) -> None:
    root, truth = hand
    ds = open_dataset(root)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    got = dict(zip((lab.stone_id for lab in kept), x, strict=True))
    for sid, (_, _, _, first) in SESSIONS.items():
        served = sorter_inputs(root / "images" / "raw" / sid, tmp_path / sid)
        ids = [f"S{first + k:06d}" for k in range(4)]
        assert sorted(served) == ids, "the sorter decides each stone once, the still one too"
        for stone_id in ids:
            assert got[stone_id].dtype == np.uint8 and got[stone_id].shape == (SIZE, SIZE, 6)
            assert np.array_equal(got[stone_id], served[stone_id]), (sid, stone_id)
            # ... and it is the labelled stone: its own toplit grey at the centre, at the model's scale.
            grey = truth[stone_id][2]
            centre = got[stone_id][SIZE // 2 - 2:SIZE // 2 + 3, SIZE // 2 - 2:SIZE // 2 + 3, 3:]
            assert abs(float(centre.mean()) - grey) < 6, (stone_id, centre.mean(), grey)
    assert report.raw == 12


def test_a_stone_that_cannot_be_found_is_skipped_with_its_reason(hand: tuple[Path, dict]) -> None:
    root, _ = hand
    ds = open_dataset(root)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    kept_ids = {lab.stone_id for lab in kept}
    assert not {"S000206", "S000207"} & kept_ids
    assert len(kept) == len(x) == len(ds.labels) - 2
    assert report.raw + report.processed + sum(report.skipped.values()) == len(ds.labels)
    reasons = {r: report.examples[r] for r in report.skipped}
    assert [k for k, v in reasons.items() if "S000206" in v][0].startswith("not found")
    assert [k for k, v in reasons.items() if "S000207" in v][0] == "its raw_pair is not in its session"
    # The unlinked stone, and the one without a position in a pair of stones not named after it
    # (how the trainer's inbox keeps a flagged stone), are their processed crops, counted, with why.
    assert report.processed == 2 and sum(report.fallback.values()) == 2
    why = {report.examples[r][0]: r for r in report.fallback}
    assert why["P000001"].startswith("no session") and why["S000205"].startswith("ambiguous: no raw_x_mm")
    line = report.line("train")
    assert line.startswith("inputs (train): 12 from raw frames, 2 from processed crops (")
    assert "2 skipped (" in line and "S000206" in line and "\n" not in line
    # --crops raw: no processed crop stands in for it
    _, _, raw = load_samples(ds, ds.labels, SIZE, CROP_MM, source="raw")
    assert [k for k, v in raw.skipped.items() if "S000205" in raw.examples[k]][0].startswith("ambiguous")


def test_source_raw_skips_the_unlinked_and_processed_is_the_old_path(hand: tuple[Path, dict]) -> None:
    root, _ = hand
    ds = open_dataset(root)
    kept, _, report = load_samples(ds, ds.labels, SIZE, CROP_MM, source="raw")
    assert "P000001" not in {lab.stone_id for lab in kept} and report.processed == 0
    assert any(r.startswith("no raw link: no session") for r in report.skipped)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM, source="processed")
    assert kept == ds.labels and report.processed == len(ds.labels) and report.raw == 0
    assert np.array_equal(x, load_crops(ds, ds.labels, SIZE, CROP_MM))
    with pytest.raises(ValueError, match="crop source 'frames': must be one of auto, raw, processed"):
        load_samples(ds, ds.labels, SIZE, CROP_MM, source="frames")


def test_a_processed_only_dataset_loads_as_before(tmp_path: Path) -> None:
    """No raw frames at all (a crop-only tool's dataset): every input is load_crops', counted."""
    ids = [f"S{k:06d}" for k in range(1, 6)]
    (tmp_path / "labels.jsonl").write_text("".join(
        json.dumps({"stone_id": s, "color": "light", "clarity": "translucent"}) + "\n" for s in ids))
    _write_processed(tmp_path, ids)
    ds = open_dataset(tmp_path)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    assert kept == ds.labels and np.array_equal(x, load_crops(ds, ds.labels, SIZE, CROP_MM))
    assert (report.raw, report.processed, sum(report.skipped.values())) == (0, 5, 0)
    assert report.fallback == {"no session (its session_id names no images/raw/*/session_meta.json)": 5}


def test_a_malformed_link_is_one_clear_line_naming_the_label(tmp_path: Path) -> None:
    write_session(tmp_path, "s15")
    bad = {"stone_id": "S000101", "color": "blue", "clarity": "transparent", "session_id": "s15",
           "raw_x_mm": "seven", "raw_y_mm": 4.0}
    (tmp_path / "labels.jsonl").write_text(json.dumps(bad) + "\n")
    _write_processed(tmp_path, ["S000101"])
    ds = open_dataset(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_samples(ds, ds.labels, SIZE, CROP_MM)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'labels.jsonl'}:1: raw_x_mm = 'seven'")
    assert "each a number of mm" in msg


def test_report_counts_are_what_the_manifest_keeps() -> None:
    r = SampleReport(raw=3, processed=1)
    r.note(r.fallback, "no raw frames in its session", "S1")
    r.note(r.skipped, "ambiguous: x", "S2")
    assert r.as_dict() == {"raw": 3, "processed": 1, "fallback": {"no raw frames in its session": 1},
                           "skipped": {"ambiguous: x": 1}}
    # Batches add up to one report: counts summed, at most three examples per reason.
    other = SampleReport(raw=2)
    for sid in ("S3", "S4", "S5"):
        other.note(other.skipped, "ambiguous: x", sid)
    r.add(other)
    assert r.as_dict()["raw"] == 5 and r.skipped == {"ambiguous: x": 4} and r.n_skipped == 4
    assert r.examples["ambiguous: x"] == ["S2", "S3", "S4"]
    assert r.skipped_text() == "4 skipped (ambiguous: x: 4, e.g. S2, S3, S4)"


def raw_only_session(root: Path) -> None:
    """Session s15 and labels S000101..S000104 by position, frames only (no images/processed/); and
    its first pair saved a second time as S000110 (the same capture twice), labelled as S000110."""
    truth = write_session(root, "s15")
    folder = root / "images" / "raw" / "s15"
    for mode in ("backlit", "toplit"):
        (folder / mode / "S000110.png").write_bytes((folder / mode / "S000101.png").read_bytes())
    first = json.loads((folder / "frames.jsonl").read_text().splitlines()[0])
    again = {k: v + 400_000_000 if k.startswith("t_") else v for k, v in first.items()} | {"stone_id": "S000110"}
    with open(folder / "frames.jsonl", "a") as fh:
        fh.write(json.dumps(again) + "\n")
    lines = []
    for sid in ("S000101", "S000102", "S000103", "S000104", "S000110"):
        x, y, _ = truth["S000101" if sid == "S000110" else sid]
        lines.append({"stone_id": sid, "color": "blue", "clarity": "transparent", "session_id": "s15",
                      "raw_x_mm": x, "raw_y_mm": y} | ({"raw_pair": sid} if sid in ("S000104", "S000110") else {}))
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_a_raw_only_dataset_is_cut_from_its_frames_and_a_capture_saved_twice_is_one_stone(tmp_path: Path) -> None:
    raw_only_session(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.raw_only
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    assert kept == ds.labels and (report.raw, report.processed, report.n_skipped) == (5, 0, 0)
    assert np.array_equal(x[0], x[4])  # the same capture cuts alike ...
    kept, dups = dedupe(ds, ds.labels, SIZE, CROP_MM)  # ... so §3.5 finds it by its input's digest
    assert [lab.stone_id for lab in kept] == ["S000101", "S000102", "S000103", "S000104"]
    assert [(d.stone_id, d.same_as, d.labels_agree) for d in dups] == [("S000110", "S000101", True)]
    with pytest.raises(DatasetError) as err:
        load_samples(ds, ds.labels, SIZE, CROP_MM, source="processed")
    assert str(err.value) == (f"{tmp_path}: has only raw frames (no images/processed/), so --crops processed has "
                              "no crops to read: choose --crops auto or --crops raw (each input cut from its raw "
                              "frame pair, as the sorter cuts it)")


def test_a_simulated_dataset_links_every_stone_to_its_raw_pair(tmp_path: Path) -> None:
    """sim generate records raw_pair + raw_x_mm/raw_y_mm: every stone is cut from its frames, and at
    the simulator's own scale and crop (no framing offset on a nominal lot) that is its processed crop."""
    from sorterd.sim.generate import GenerateOptions, generate
    from sorterd.sim.lots import get_lot

    cfg = load_config(config.sim_config_path())
    generate(cfg, GenerateOptions(out=tmp_path, stones=12, lot=get_lot("thai-mixed"), seed=5, session_stones=6))
    ds = open_dataset(tmp_path)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    assert (report.raw, report.processed, sum(report.skipped.values())) == (12, 0, 0)
    assert kept == ds.labels and np.array_equal(x, load_crops(ds, ds.labels, SIZE, CROP_MM))
    # An older dataset (raw_pair, no position): stones are matched by order only where every object
    # of their pair is named after it; any other is skipped, counted -- never given a neighbour's crop.
    lines = [json.loads(s) for s in (tmp_path / "labels.jsonl").read_text().splitlines()]
    (tmp_path / "labels.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in ("raw_x_mm", "raw_y_mm")}) + "\n" for r in lines))
    ds = open_dataset(tmp_path)
    kept, x, report = load_samples(ds, ds.labels, SIZE, CROP_MM)
    assert report.raw + sum(report.skipped.values()) == 12 and report.processed == 0, report.line("all")
    assert all(r.startswith(("ambiguous", "not found")) for r in report.skipped)
    assert np.array_equal(x, load_crops(ds, kept, SIZE, CROP_MM))


def test_the_cache_serves_what_was_cut_and_never_a_stale_input(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import sorterd.data.samples as samples

    root = tmp_path / "data"
    write_dataset(root)
    ds = open_dataset(root)
    cache = tmp_path / "cache"
    first = load_samples(ds, ds.labels, SIZE, CROP_MM, cache=cache)
    segmented: list[str] = []
    real = samples.segment_recorded
    monkeypatch.setattr(samples, "segment_recorded", lambda r, p: segmented.append(p) or real(r, p))
    again = load_samples(ds, ds.labels, SIZE, CROP_MM, cache=cache)
    assert again[0] == first[0] and np.array_equal(again[1], first[1]) and again[2] == first[2]
    # Only the pairs holding a skipped stone are segmented again (skips are not cached).
    assert sorted(segmented) == ["S000204"]
    # One frame changes (a re-capture under the same name): that pair is cut afresh.
    frame = root / "images" / "raw" / "s15" / "toplit" / "S000101.png"
    img = cv2.imread(str(frame))
    img[:, :, :] = np.clip(img.astype(int) + 9, 0, 255).astype(np.uint8)
    cv2.imwrite(str(frame), img)
    segmented.clear()
    changed = load_samples(ds, ds.labels, SIZE, CROP_MM, cache=cache)
    assert sorted(segmented) == ["S000101", "S000204"]
    uncached = load_samples(ds, ds.labels, SIZE, CROP_MM)
    assert np.array_equal(changed[1], uncached[1]) and not np.array_equal(changed[1], first[1])
