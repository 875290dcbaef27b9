"""The §7.1 dataset: what `sorterd sim generate` writes, reading it back, errors, dedupe, splits."""

from __future__ import annotations

import json
import re
import shutil
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.data.dataset import (
    MAX_REPORTED,
    Dataset,
    DatasetError,
    StoneLabel,
    dedupe,
    load_crops,
    measure_size_mm,
    open_dataset,
    read_crop,
    stone_sizes,
)
from sorterd.data.session import SessionReader
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import LOTS
from sorterd.sorting.segment import PairingLimits, crop_halves, segment_pair
from sorterd.train.splits import Splits, choose_test_lots, make_splits, read_splits, write_splits

SECTION_3_4 = {"stone_id", "color", "clarity", "lot_id", "session_id", "annotator", "timestamp",
               "uncertain", "mixed", "damaged", "reject", "notes"}
SECTION_2_4 = {"session_id", "timestamp_start", "lot_id", "lot_description", "backlight_exposure_us",
               "ringlight_exposure_us", "camera_gain", "white_balance_matrix", "reference_backlight_intensity",
               "reference_check_passed", "ambient_temp_c", "notes"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lots, three sessions: what appending a second lot to a dataset gives."""
    out = tmp_path_factory.mktemp("data") / "ds"
    cfg = load_config(config.sim_config_path())
    generate(cfg, GenerateOptions(out, 30, LOTS["thai-mixed"], seed=1, session_stones=20, day=date(2026, 3, 2)))
    generate(cfg, GenerateOptions(out, 12, LOTS["anakie-dark"], seed=2, day=date(2026, 3, 2)))
    return out


def labels_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "labels.jsonl").read_text().splitlines()]


# -- what sim generate writes ---------------------------------------------------------------------


def test_layout_follows_section_7_1(generated: Path) -> None:
    labels = labels_of(generated)
    assert len(labels) == 42
    sessions = sorted(p.name for p in (generated / "images" / "raw").iterdir())
    assert sessions == ["2026-03-02_001", "2026-03-02_002", "2026-03-02_003"]  # §7.2 ids, continued
    for sid in sessions:
        folder = generated / "images" / "raw" / sid
        meta = json.loads((folder / "session_meta.json").read_text())
        assert SECTION_2_4 <= set(meta) and meta["pixels_per_mm"] == 20.0
        assert json.loads((generated / "sessions" / f"{sid}.json").read_text()) == meta
        for mode in ("backlit", "toplit"):
            ref = cv2.imread(str(folder / "reference" / f"{mode}.png"))
            assert ref is not None and ref.shape == (240, 640, 3)
    for lab in labels:
        assert SECTION_3_4 <= set(lab)
        assert re.fullmatch(r"S\d{6}", lab["stone_id"])
        pair = generated / "images" / "raw" / lab["session_id"]
        for mode in ("backlit", "toplit"):
            assert (pair / mode / f"{lab['raw_pair']}.png").is_file()
            crop = cv2.imread(str(generated / "images" / "processed" / mode / f"{lab['stone_id']}.png"))
            assert crop.shape == (128, 128, 3)  # 6.4 mm at 20 px/mm


def test_appending_a_lot_continues_the_stone_numbers(generated: Path) -> None:
    ids = [lab["stone_id"] for lab in labels_of(generated)]
    assert ids == [f"S{i:06d}" for i in range(1, 43)]
    lots = [lab["lot_id"] for lab in labels_of(generated)]
    assert lots == ["LOT-2026-001"] * 30 + ["LOT-2026-006"] * 12


def test_flags_and_labels_are_consistent(generated: Path) -> None:
    for lab in labels_of(generated):
        if lab["reject"]:
            assert lab["color"] is None and lab["clarity"] is None
        else:
            assert lab["color"] in ("blue", "light", "inky")
        assert isinstance(lab["size_mm"], float) and 0.5 < lab["size_mm"] < 7.0


def test_crops_are_what_the_daemon_cuts_from_the_raw_pair(generated: Path) -> None:
    """Re-segmenting a raw pair against its session's references reproduces the processed crop."""
    cfg = load_config(config.sim_config_path())
    lab = next(lab for lab in labels_of(generated) if lab["raw_pair"] == lab["stone_id"])
    session = SessionReader(generated / "images" / "raw" / lab["session_id"])
    back, top = session.read_pair(lab["stone_id"])
    lim = PairingLimits(20.0, 0.01, cfg.geometry.speed_min_mm_s, cfg.geometry.speed_max_mm_s, 9.6)
    seg = segment_pair(back, top, session.references["backlit"], session.references["toplit"], 0, lim)
    crops = [crop_halves(back, top, obs, 128, 128) for obs in seg.observations if not obs.cluster]
    saved = [cv2.imread(str(generated / "images" / "processed" / m / f"{lab['stone_id']}.png"))
             for m in ("backlit", "toplit")]
    assert any(np.array_equal(c[0], saved[0]) and np.array_equal(c[1], saved[1]) for c in crops)


def test_generated_dataset_reads_back(generated: Path) -> None:
    ds = open_dataset(generated)
    assert len(ds.labels) == 42 and ds.lots() == ["LOT-2026-001", "LOT-2026-006"]
    assert ds.crop_mm() == 6.4
    assert set(ds.sessions) == {"2026-03-02_001", "2026-03-02_002", "2026-03-02_003"}
    x = load_crops(ds, ds.labels[:3], 128)
    assert x.shape == (3, 128, 128, 6) and x.dtype == np.uint8
    # Backlit first (the bright panel), toplit second (18 % gray), RGB order.
    assert x[:, :4, :4, :3].mean() > 180 and 90 < x[:, :4, :4, 3:].mean() < 140


def test_measured_size_matches_the_segmenter(generated: Path) -> None:
    ds = open_dataset(generated)
    for lab in ds.labels[:10]:
        measured = measure_size_mm(read_crop(ds, lab, "backlit"), 20.0)
        assert measured == pytest.approx(lab.size_mm, rel=0.15, abs=0.15)


# -- a dataset written by hand ------------------------------------------------------------------


def write_stone(root: Path, sid: str, shape: tuple[int, ...], colour: tuple[int, int, int], bright: int) -> None:
    for mode, value in (("backlit", bright), ("toplit", colour)):
        folder = root / "images" / "processed" / mode
        folder.mkdir(parents=True, exist_ok=True)
        img = np.full(shape, 235 if mode == "backlit" else 118, np.uint8)
        h, w = shape[:2]
        cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, value if len(shape) == 3 else int(np.mean(value)), -1)
        cv2.imwrite(str(folder / f"{sid}.png"), img)


def hand_written(root: Path) -> Path:
    """Three stones, other sizes and formats, minimal labels (no lot, no session, no size)."""
    write_stone(root, "a1", (90, 70, 3), (200, 60, 30), 200)
    write_stone(root, "a2", (300, 300, 3), (230, 200, 190), 60)
    write_stone(root, "a3", (64, 64), (40, 20, 10), 10)  # grayscale
    (root / "labels.jsonl").write_text(
        '{"stone_id": "a1", "color": "blue", "clarity": "transparent"}\n\n'
        '{"stone_id": "a2", "color": "light", "clarity": "translucent", "lot_id": "L2"}\n'
        '{"stone_id": "a3", "color": "inky", "clarity": "opaque", "uncertain": true, "notes": "by hand"}\n')
    return root


def test_hand_written_dataset_of_other_sizes_loads(tmp_path: Path) -> None:
    ds = open_dataset(hand_written(tmp_path))
    assert [lab.stone_id for lab in ds.labels] == ["a1", "a2", "a3"]
    assert ds.labels[0].lot_id == "LOT-UNKNOWN" and ds.labels[2].flags == {"uncertain"}
    x = load_crops(ds, ds.labels, 128)
    assert x.shape == (3, 128, 128, 6)
    assert stone_sizes(ds, ds.labels) == [None, None, None]  # no size and no pixels_per_mm
    assert ds.crop_mm() is None


def broken(tmp_path: Path, line: str) -> Path:
    root = hand_written(tmp_path)
    with open(root / "labels.jsonl", "a") as fh:
        fh.write(line + "\n")
    return root


@pytest.mark.parametrize(("line", "message"), [
    ('{"stone_id": "a4", "color": "blue", "clarity": "opaque"', r"labels\.jsonl:5: not valid JSON"),
    ('{"stone_id": "a1", "color": "navy", "clarity": "opaque"}',
     r"labels\.jsonl:5: unknown color 'navy': valid color classes are blue, light, inky"),
    ('{"stone_id": "a1", "color": "blue", "clarity": "milky"}',
     r"labels\.jsonl:5: unknown clarity 'milky': valid clarity classes are transparent, translucent, opaque"),
    ('{"stone_id": "a1", "color": "blue", "clarity": "opaque"}', r"labels\.jsonl:5: stone_id 'a1' already labelled on line 1"),
    ('{"color": "blue", "clarity": "opaque"}', r"labels\.jsonl:5: lacks \"stone_id\""),
    ('{"stone_id": "../x", "color": "blue", "clarity": "opaque"}', r"labels\.jsonl:5: stone_id '\.\./x'"),
    ('{"stone_id": "a9", "color": "blue", "clarity": null}', r"labels\.jsonl:5: color 'blue' with clarity None"),
    ('{"stone_id": "a9", "color": "blue", "clarity": "opaque", "mixed": "yes"}', r"labels\.jsonl:5: mixed = 'yes'"),
    ('{"stone_id": "a9", "color": "inky", "clarity": "opaque", "reject": true}', r"labels\.jsonl:5: a reject"),
    ('["a9", "blue"]', r"labels\.jsonl:5: must be a JSON object"),
    ('{"stone_id": "a9", "color": "blue", "clarity": "opaque", "size_mm": -2}', r"labels\.jsonl:5: size_mm = -2"),
])
def test_bad_label_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        open_dataset(broken(tmp_path, line))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    root = broken(tmp_path, '{"stone_id": "a4", "color": "navy", "clarity": "milky", "mixed": "yes"}\n'
                            '{"stone_id": "a1", "color": "blue", "clarity": "opaque"}\n'
                            '{"stone_id": "a5", "color": "blue"')
    (root / "images" / "processed" / "toplit" / "a2.png").unlink()
    meta = root / "images" / "raw" / "s1" / "session_meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"session_id": "s1", "pixels_per_mm": "twenty"}')
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    problems = err.value.problems
    expected = [r"labels\.jsonl:5: mixed = 'yes'", r"labels\.jsonl:5: unknown color 'navy'",
                r"labels\.jsonl:5: unknown clarity 'milky'", r"labels\.jsonl:6: stone_id 'a1' already labelled",
                r"labels\.jsonl:7: not valid JSON", r"s1/session_meta\.json: pixels_per_mm = 'twenty'",
                r"labels\.jsonl:3: stone a2: missing image .*toplit/a2\.png"]
    assert len(problems) == len(expected)
    for pattern, problem in zip(expected, problems, strict=True):
        assert re.search(pattern, problem), (pattern, problem)
    assert str(err.value).startswith(f"{len(expected)} problems:\n  - ")


def test_a_long_list_of_problems_is_capped(tmp_path: Path) -> None:
    n = MAX_REPORTED + 7
    root = broken(tmp_path, "\n".join(f'{{"stone_id": "b{i}", "color": "navy", "clarity": "opaque"}}' for i in range(n)))
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    assert len(err.value.problems) == n
    text = str(err.value)
    assert text.count("\n  - ") == MAX_REPORTED and text.endswith("\n  ... and 7 more")


def test_missing_image_names_the_label_line_and_the_file(tmp_path: Path) -> None:
    root = hand_written(tmp_path)
    (root / "images" / "processed" / "toplit" / "a2.png").unlink()
    with pytest.raises(DatasetError, match=r"labels\.jsonl:3: stone a2: missing image .*toplit/a2\.png"):
        open_dataset(root)


def raw_only(generated: Path, root: Path) -> Path:
    """The generated dataset as a capture program that keeps only whole frames would write it."""
    shutil.copytree(generated, root)
    shutil.rmtree(root / "images" / "processed")
    return root


def test_a_dataset_of_raw_frames_only_opens_when_every_label_traces_to_them(tmp_path: Path, generated: Path) -> None:
    ds = open_dataset(raw_only(generated, tmp_path / "ds"))
    assert ds.raw_only and len(ds.labels) == 42 and ds.crop_mm() is None
    assert not open_dataset(generated).raw_only


def test_a_raw_only_label_that_leads_to_no_frames_is_named_with_why_and_the_layouts(tmp_path: Path,
                                                                                   generated: Path) -> None:
    root = raw_only(generated, tmp_path / "ds")
    first = labels_of(root)[0]
    with open(root / "labels.jsonl", "a") as fh:
        for extra in ({"stone_id": "X1", "session_id": "elsewhere"},
                      {"stone_id": "X2", "raw_pair": "S999999"},
                      {"stone_id": "X3", "raw_x_mm": -1.0}):
            fh.write(json.dumps(first | extra) + "\n")
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    head, *each = err.value.problems
    assert head.startswith(f"{root}: has no images/processed/, so each stone's input is cut from its raw frames, "
                           "and 3 of 45 labels cannot be traced to them")
    assert "session_meta.json giving pixels_per_mm" in head and "images/processed/{backlit,toplit}/<stone_id>.png" in head
    where = root / "labels.jsonl"
    assert each[0] == (f"{where}:43: stone X1: not traceable to raw frames: no session (its session_id names no "
                       "images/raw/*/session_meta.json)")
    assert each[1].startswith(f"{where}:44: stone X2: not traceable to raw frames: its raw_pair 'S999999' is not in "
                              "its session (")
    assert each[2].startswith(f"{where}:45: stone X3: raw_x_mm = -1.0") and len(each) == 3


def test_a_raw_only_session_without_its_reference_frames_names_its_labels(tmp_path: Path, generated: Path) -> None:
    root = raw_only(generated, tmp_path / "ds")
    session = sorted((root / "images" / "raw").iterdir())[0]
    shutil.rmtree(session / "reference")
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    named = [p for p in err.value.problems[1:] if p.endswith("not traceable to raw frames: no reference frames "
                                                             "in its session")]
    ids = {lab["stone_id"] for lab in labels_of(root) if lab["session_id"] == json.loads(
        (session / "session_meta.json").read_text())["session_id"]}
    assert len(named) == len(ids) == len(err.value.problems) - 1 > 0


def test_unreadable_image_names_the_stone(tmp_path: Path) -> None:
    root = hand_written(tmp_path)
    (root / "images" / "processed" / "backlit" / "a1.png").write_bytes(b"not a png")
    ds = open_dataset(root)
    with pytest.raises(DatasetError, match=r"labels\.jsonl:1: stone a1: .*a1\.png is not a readable image"):
        load_crops(ds, ds.labels, 128)


def test_missing_labels_file_and_bad_session_meta(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels\.jsonl: missing"):
        open_dataset(tmp_path)
    root = hand_written(tmp_path)
    meta = root / "images" / "raw" / "s1" / "session_meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"session_id": "s1", "pixels_per_mm": "twenty"}')
    with pytest.raises(DatasetError, match=r"s1/session_meta\.json: pixels_per_mm = 'twenty'"):
        open_dataset(root)


def test_size_is_measured_when_the_session_knows_its_scale(tmp_path: Path) -> None:
    root = hand_written(tmp_path)
    meta = root / "images" / "raw" / "s1" / "session_meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"session_id": "s1", "pixels_per_mm": 20.0}')
    lines = (root / "labels.jsonl").read_text().replace('"lot_id": "L2"', '"lot_id": "L2", "session_id": "s1"')
    (root / "labels.jsonl").write_text(lines)
    ds = open_dataset(root)
    sizes = stone_sizes(ds, ds.labels)
    assert sizes[0] is None and sizes[1] == pytest.approx(2 * 75 / 20.0, rel=0.05)  # radius 75 px disc


# -- duplicates and splits -------------------------------------------------------------------------


def test_duplicates_by_image_hash_are_found(tmp_path: Path, generated: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(generated, root)
    for mode in ("backlit", "toplit"):
        src = root / "images" / "processed" / mode / "S000005.png"
        # Re-encoded with another compression: same pixels, other bytes.
        cv2.imwrite(str(src.with_name("S000999.png")), cv2.imread(str(src)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    first = labels_of(root)[4]
    with open(root / "labels.jsonl", "a") as fh:
        fh.write(json.dumps(first | {"stone_id": "S000999"}) + "\n")
    ds = open_dataset(root)
    kept, dups = dedupe(ds, ds.labels)
    assert len(kept) == 42 and [(d.stone_id, d.same_as, d.labels_agree) for d in dups] == [("S000999", "S000005", True)]


def fake(n: int, lot: str, start: int = 0, reject_every: int = 0) -> list[StoneLabel]:
    classes = [("blue", "transparent"), ("blue", "translucent"), ("light", "translucent"), ("inky", "opaque")]
    out = []
    for i in range(n):
        color, clarity = classes[i % len(classes)]
        reject = bool(reject_every) and i % reject_every == 0
        out.append(StoneLabel(f"S{start + i:06d}", None if reject else color, None if reject else clarity,
                              lot, "", frozenset({"reject"}) if reject else frozenset(), "", 2.5, i + 1))
    return out


def test_splits_hold_out_whole_lots_and_stratify_validation() -> None:
    labels = fake(400, "A") + fake(400, "B", 1000) + fake(120, "C", 2000, reject_every=30)
    s = make_splits(labels, version="v001", seed=3)
    assert s.lot_holdout and s.test_lots == ["C"]
    assert {lab.lot_id for lab in labels if lab.stone_id in s.test} == {"C"}
    assert set(s.train) | set(s.val) | set(s.test) == {lab.stone_id for lab in labels}
    assert not (set(s.train) & set(s.val)) and not (set(s.val) & set(s.test))
    assert len(s.val) == pytest.approx(0.10 * len(labels), abs=2)
    by_id = {lab.stone_id: lab for lab in labels}
    for lot in ("A", "B"):  # every (lot, class) group gives its share to validation
        for cls in ("blue_transparent", "inky_opaque"):
            group = [sid for sid in s.val if by_id[sid].lot_id == lot and by_id[sid].class_name == cls]
            assert 8 <= len(group) <= 13


def test_test_lots_are_chosen_smallest_first_within_limits() -> None:
    labels = fake(500, "big") + fake(60, "s1", 1000) + fake(70, "s2", 2000) + fake(400, "mid", 3000)
    assert choose_test_lots(labels, 0.10, 0.35) == ["s1", "s2"]
    assert choose_test_lots(fake(100, "only"), 0.10, 0.35) == []
    assert choose_test_lots(fake(100, "a") + fake(100, "b", 500), 0.10, 0.35) == []  # each is 50 %


def test_one_lot_falls_back_to_a_stratified_random_test_split() -> None:
    s = make_splits(fake(200, "A"), version="v001", seed=0)
    assert not s.lot_holdout and s.test_lots == []
    assert len(s.test) == 20 and len(s.val) == 20


def test_explicit_test_lots_must_exist() -> None:
    with pytest.raises(DatasetError, match=r"test lots \['Z'\] are not in the dataset; its lots are A, B"):
        make_splits(fake(50, "A") + fake(50, "B", 100), version="v001", test_lots=["Z"])


def snapshot_of_a_copy(tmp_path: Path, generated: Path, version: str) -> tuple[Dataset, Splits, Path]:
    """A copy of the generated dataset with one split snapshot written (seed 1)."""
    root = tmp_path / "ds"
    shutil.copytree(generated, root)
    ds = open_dataset(root)
    s = make_splits(ds.labels, version=version, seed=1)
    return ds, s, write_splits(ds, s)


def test_split_snapshot_round_trip(tmp_path: Path, generated: Path) -> None:
    ds, s, folder = snapshot_of_a_copy(tmp_path, generated, "v007")
    assert sorted(p.name for p in folder.iterdir()) == ["duplicates.txt", "split_info.json", "test.txt",
                                                         "train.txt", "val.txt"]
    back = read_splits(ds, "v007")
    assert (back.train, back.val, back.test, back.test_lots) == (s.train, s.val, s.test, ["LOT-2026-006"])
    with pytest.raises(DatasetError, match="exists already"):
        write_splits(ds, s)
    with pytest.raises(DatasetError, match="no split snapshot 'v008'; this dataset has v007"):
        read_splits(ds, "v008")


def test_a_snapshot_that_leaks_between_splits_is_refused(tmp_path: Path, generated: Path) -> None:
    """A hand-edited snapshot reused with --splits: a stone in two splits, or a held-out lot's stone in train."""
    ds, s, folder = snapshot_of_a_copy(tmp_path, generated, "v001")
    train, test = (folder / "train.txt").read_text(), (folder / "test.txt").read_text()
    (folder / "train.txt").write_text(train + s.test[0] + "\n")  # a test stone, trained on too
    n = len(s.train) + 1
    with pytest.raises(DatasetError, match=rf"test\.txt:1: stone '{s.test[0]}' is also listed at .*train\.txt:{n}; "
                                           "a stone belongs to one split"):
        read_splits(ds, "v001")
    (folder / "train.txt").write_text(train)
    (folder / "test.txt").write_text(test.replace(s.test[0] + "\n", ""))  # moved: now in no split twice
    (folder / "val.txt").write_text((folder / "val.txt").read_text() + s.test[0] + "\n")
    with pytest.raises(DatasetError, match=rf"val\.txt:{len(s.val) + 1}: stone '{s.test[0]}' is of lot LOT-2026-006, "
                                           r"which .*split_info\.json holds out whole for test \(§7\.4\)"):
        read_splits(ds, "v001")
