"""§8 evaluation: metrics on known predictions, the §8.4 verdict, comparison, ONNX inference, report."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.config import DecisionConfig
from sorterd.data.bundle import resolve_bundle
from sorterd.data.dataset import StoneLabel, open_dataset, stone_sizes
from sorterd.domain import cost_weighted_accuracy
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import LOTS
from sorterd.sorting.decide import class_bin
from sorterd.train.evaluate import compare, evaluate, format_comparison, format_text, predict
from sorterd.train.temperature import calibration_error, expected_calibration_error, reliability_bins

DCFG = DecisionConfig()
COLORS = ("blue", "light", "inky")
CLARITIES = ("transparent", "translucent", "opaque")


def label(i: int, color: str | None, clarity: str | None, lot: str = "L1", flags: frozenset[str] = frozenset(),
          size: float | None = 3.0) -> StoneLabel:
    return StoneLabel(f"S{i:06d}", color, clarity, lot, "", flags, "", size, i + 1)


def onehot(idx: int, p: float = 0.98) -> np.ndarray:
    v = np.full(3, (1 - p) / 2)
    v[idx] = p
    return v


def run(stones: list[tuple[StoneLabel, str, str, float]]) -> dict:
    """Each stone: (label, predicted colour, predicted clarity, confidence of both heads)."""
    labels = [s[0] for s in stones]
    pc = np.array([onehot(COLORS.index(c), p) for _, c, _, p in stones])
    pk = np.array([onehot(CLARITIES.index(k), p) for _, _, k, p in stones])
    return evaluate(labels, [lab.size_mm for lab in labels], pc, pk, DCFG).metrics


def test_accuracies_and_confusion_on_known_predictions() -> None:
    stones = [
        (label(0, "blue", "transparent"), "blue", "transparent", 0.98),
        (label(1, "blue", "transparent"), "blue", "translucent", 0.98),  # clarity wrong: CUT -> FLIP
        (label(2, "light", "translucent"), "light", "translucent", 0.98),
        (label(3, "inky", "opaque"), "blue", "opaque", 0.98),  # colour wrong: REJECT -> FLIP
    ]
    m = run(stones)
    assert (m["overall"], m["color"], m["clarity"]) == (0.5, 0.75, 0.75)
    assert m["confusion"]["color"]["matrix"] == [[2, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert m["confusion"]["clarity"]["matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    combined = np.array(m["confusion"]["combined"]["matrix"])
    assert combined.sum() == 4 and combined[0, 0] == 1 and combined[0, 1] == 1 and combined[8, 2] == 1
    assert m["per_class"]["blue_transparent"] == {"n": 2, "accuracy": 0.5}
    assert m["per_class"]["inky_opaque"] == {"n": 1, "accuracy": 0.0}
    assert m["per_class"]["light_opaque"] == {"n": 0, "accuracy": None}


def test_cost_weighted_uses_the_daemons_bins_and_the_8_2_costs() -> None:
    stones = [
        (label(0, "blue", "transparent", size=3.0), "blue", "transparent", 0.98),  # CUT -> CUT
        (label(1, "blue", "transparent", size=3.0), "blue", "translucent", 0.98),  # CUT -> FLIP: 10
        (label(2, "blue", "transparent", size=1.5), "blue", "transparent", 0.98),  # small: SELECT -> SELECT
        (label(3, "light", "opaque"), "blue", "transparent", 0.98),  # FLIP -> CUT: 7
        (label(4, "inky", "opaque"), "inky", "opaque", 0.6),  # REJECT -> REJECT, flagged
        (label(5, "blue", "opaque"), "blue", "opaque", 0.4),  # low confidence: FLIP -> SELECT: 1
    ]
    m = run(stones)
    true = ["CUT", "CUT", "SELECT", "FLIP", "REJECT", "FLIP"]
    got = ["CUT", "FLIP", "SELECT", "CUT", "REJECT", "SELECT"]
    assert m["cost_weighted"] == pytest.approx(cost_weighted_accuracy(true, got), abs=1e-5)
    assert m["cost_weighted"] == pytest.approx(1 - 18 / (10 + 10 + 5 + 7 + 1 + 7), abs=1e-5)
    assert m["bins"]["matrix"][0] == [1, 0, 1, 0]  # true CUT row
    assert m["cut_purity"] == 0.5 and m["cut_recall"] == 0.5 and m["cut"] == {"decided": 2, "true": 2, "correct": 1}
    assert m["flagged_rate"] == pytest.approx(2 / 6, abs=1e-4)
    assert m["select_divert_rate"] == pytest.approx(1 / 6, abs=1e-4)
    assert class_bin("blue", "transparent", 1.5, DCFG) == "SELECT"


def test_reject_stones_belong_in_reject_and_skipped_stones_only_count_as_flagged() -> None:
    stones = [
        (label(0, None, None, flags=frozenset({"reject"})), "light", "transparent", 0.9),  # REJECT -> SELECT
        (label(1, None, None), "blue", "opaque", 0.3),  # skipped: right bin unknown
        (label(2, "blue", "opaque"), "blue", "opaque", 0.95),
    ]
    m = run(stones)
    assert (m["n_stones"], m["n_classified"], m["n_reject"]) == (3, 1, 1)
    assert m["overall"] == 1.0
    assert m["bins"]["matrix"][3] == [0, 1, 0, 0]
    assert m["cost_weighted"] == pytest.approx(1 - 1 / (1 + 7), abs=1e-5)
    assert m["flagged_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["subsets"]["reject"]["n"] == 1


def test_unknown_sizes_are_taken_as_cut_eligible() -> None:
    m = run([(label(0, "blue", "transparent", size=None), "blue", "transparent", 0.99)])
    assert m["sizes_unknown"] == 1 and m["cut"]["true"] == 1 and m["cut_recall"] == 1.0


def test_per_lot_and_hard_case_subsets() -> None:
    stones = [(label(i, "blue", "translucent", lot="A"), "blue", "translucent", 0.95) for i in range(8)]
    stones += [(label(10 + i, "light", "opaque", lot="B", flags=frozenset({"uncertain"})), "light",
                "translucent" if i % 2 else "opaque", 0.6) for i in range(4)]
    m = run(stones)
    assert m["per_lot"]["A"]["overall"] == 1.0 and m["per_lot"]["B"]["overall"] == 0.5
    assert m["per_lot"]["B"]["flagged_rate"] == 1.0
    assert m["subsets"]["uncertain"] == {"n": 4, "accuracy": 0.5, "flagged_rate": 1.0, "select_divert_rate": 0.0}
    assert m["subsets"]["clean"]["n"] == 8


def perfect_lot(n: int = 200) -> list[tuple[StoneLabel, str, str, float]]:
    classes = [(c, k) for c in COLORS for k in CLARITIES]
    return [(label(i, *classes[i % 9]), *classes[i % 9], 0.97) for i in range(n)]


def test_verdict_passes_a_good_model_and_names_each_failure() -> None:
    good = run(perfect_lot())
    v = good["verdict"]
    assert v["ready"] and not v["failed"]
    assert v["pending"] == ["QA reference stones >= 90 % agreement"]
    assert [c["pass"] for c in v["criteria"]] == [True, True, True, True, True, None]
    assert good["milestones"]["reached"] == "Stretch"
    # Every blue+transparent called translucent: CUT recall and that class fail.
    bad = [(lab, c, "translucent" if lab.class_name == "blue_transparent" else k, p) for lab, c, k, p in perfect_lot()]
    v = run(bad)["verdict"]
    assert not v["ready"]
    assert "CUT recall >= 85 %" in v["failed"]
    assert "no class below 70 % (worst: blue_transparent)" in v["failed"]
    assert v["summary"].startswith("NOT READY")


def test_milestones_check_flagged_rate_as_an_upper_bound() -> None:
    m = run([(lab, c, k, 0.7) for lab, c, k, _ in perfect_lot()])  # all right, all flagged
    rows = m["milestones"]["rows"]
    assert rows["Phase 3"]["checks"]["flagged_rate"]["pass"] is False
    assert rows["Phase 1"]["met"] is False and m["milestones"]["reached"] is None


def test_small_classes_are_reported_but_not_judged() -> None:
    stones = perfect_lot(180) + [(label(900, "inky", "transparent"), "inky", "opaque", 0.9)] * 1
    m = run(stones)
    assert m["per_class"]["inky_transparent"]["n"] == 21
    stones = perfect_lot(45) + [(label(900 + i, "light", "opaque"), "blue", "opaque", 0.9) for i in range(3)]
    m = run(stones)
    assert "light_opaque" in m["min_class_accuracy"]["too_few_stones"]


def test_stable_json_keys() -> None:
    m = run(perfect_lot(30))
    assert {"overall", "color", "clarity", "cost_weighted", "flagged_rate", "cut_purity", "cut_recall",
            "per_class", "ece", "select_divert_rate", "confusion", "per_lot", "verdict", "milestones"} <= set(m)
    json.dumps(m, allow_nan=False)  # no NaN sneaks into the JSON
    assert "overall" in format_text(m)


def test_compare_calls_a_tie_a_tie_and_a_better_model_better() -> None:
    base = perfect_lot(300)
    good = evaluate(*_arrays(base))
    worse = evaluate(*_arrays([(lab, c, "opaque" if lab.class_name == "blue_transparent" else k, p)
                               for lab, c, k, p in base]))
    same = compare(good, good)
    assert same["better"] == "tie" and same["cost_weighted_delta"] == 0.0
    c = compare(worse, good)
    assert c["better"] == "new" and c["cost_weighted_delta"] > 0 and c["cost_weighted_delta_ci95"][0] > 0
    assert compare(good, worse)["better"] == "old"
    assert "NEW is better" in format_comparison(c)


def _arrays(stones: list[tuple[StoneLabel, str, str, float]]) -> tuple:
    labels = [s[0] for s in stones]
    pc = np.array([onehot(COLORS.index(c), p) for _, c, _, p in stones])
    pk = np.array([onehot(CLARITIES.index(k), p) for _, _, k, p in stones])
    return labels, [lab.size_mm for lab in labels], pc, pk, DCFG


def test_reliability_bins_add_up_to_the_ece() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2, 1, 1], 500)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    conf, correct = probs.max(1), probs.argmax(1) == labels
    bins = reliability_bins(conf, correct, 15)
    assert sum(b.count for b in bins) == 500
    assert calibration_error(conf, correct, 15) == pytest.approx(expected_calibration_error(probs, labels, 15))


# -- through the shipped ONNX model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_stones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "ds"
    cfg = load_config(config.sim_config_path())
    generate(cfg, GenerateOptions(out, 60, LOTS["sim-default"], seed=4, day=date(2026, 3, 1)))
    return out


def test_default_model_through_onnxruntime_on_plain_stones(plain_stones: Path) -> None:
    ds = open_dataset(plain_stones)
    model = OnnxModel(resolve_bundle("default", None))
    got = predict(model, ds, ds.labels)
    pc, pk, ood = got.p_color, got.p_clarity, got.ood
    assert pc.shape == (60, 3) and np.allclose(pc.sum(1), 1.0)
    assert got.labels == ds.labels and (got.inputs.raw, got.inputs.n_skipped) == (60, 0)  # cut from raw frames
    assert (ood is None) == (model.manifest.ood is None)  # the gate's scores exactly when the bundle has one
    m = evaluate(ds.labels, stone_sizes(ds, ds.labels), pc, pk, DCFG, ood).metrics
    assert m["color"] > 0.85 and m["clarity"] > 0.85 and m["sizes_unknown"] == 0
    if ood is not None:  # the plain simulated stones are the nominal machine: known to the model
        assert m["ood_rate"] < 0.05


def test_report_is_a_page_with_embedded_plots(plain_stones: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from sorterd.train.report import write_report

    ds = open_dataset(plain_stones)
    labels = ds.labels[:30]
    got = predict(OnnxModel(resolve_bundle("default", None)), ds, labels)
    pc, pk = got.p_color, got.p_clarity
    pk[:5] = pk[:5, ::-1]  # a few mistakes, so the gallery has something to show
    ev = evaluate(labels, stone_sizes(ds, labels), pc, pk, DCFG)
    page = write_report(ev, ds, tmp_path / "rep", title="t").read_text()
    assert page.count("data:image/png;base64,") >= 7 + 2  # the plots and gallery crops
    assert "§8.4 production readiness" in page and "Costliest mistakes" in page
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["n_stones"] == 30


def test_report_gallery_marks_a_confident_disagreement_once(plain_stones: Path) -> None:
    from sorterd.train.report import _gallery

    ds = open_dataset(plain_stones)
    labels = [lab for lab in ds.labels if lab.classified and not lab.flags][:3]
    pc = np.array([onehot((lab.color_index + 1) % 3, 0.99) for lab in labels])  # sure, and wrong
    pk = np.array([onehot(lab.clarity_index, 0.99) for lab in labels])
    rows = _gallery(evaluate(labels, [lab.size_mm for lab in labels], pc, pk, DCFG), ds)
    assert len(rows) == 3
    assert {r["flags"] for r in rows} == {"confident disagreement: re-check the label (§5.3)"}


def test_evaluate_on_the_models_own_dataset_without_its_snapshot_does_not_offer_split_all(
        plain_stones: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All its stones are not new to it there: --split all would score it on its training stones."""
    import shutil

    from sorterd.cli import main
    from sorterd.train.splits import make_splits, write_splits

    root = tmp_path / "ds"
    shutil.copytree(plain_stones, root)
    ds = open_dataset(root)
    write_splits(ds, make_splits(ds.labels, version="v001", seed=0))
    bundle = tmp_path / "b"
    shutil.copytree(resolve_bundle("default", None), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["training"]["data"]["dir"] = str(root.resolve())
    manifest["training"]["splits"] |= {"version": "v009", "dir": str((root / "splits" / "v009").resolve())}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(bundle), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no split snapshot 'v009'; this dataset has v001" in err and "--split all" not in err


# -- the inputs: the sample loader's, raw frames all the way through ---------------------------------


def raw_only_copy(plain_stones: Path, root: Path, extra: list[dict] | None = None,
                  drop: tuple[str, ...] = ()) -> Path:
    """plain_stones without images/processed/ (whole frames only), label fields in `drop` removed
    and `extra` label lines added."""
    import shutil

    shutil.copytree(plain_stones, root)
    shutil.rmtree(root / "images" / "processed")
    lines = [{k: v for k, v in json.loads(x).items() if k not in drop}
             for x in (root / "labels.jsonl").read_text().splitlines()]
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*lines, *(extra or [])]))
    return root


def test_evaluate_judges_the_inputs_the_sorter_cuts_and_counts_where_they_came_from(plain_stones: Path,
                                                                                    tmp_path: Path) -> None:
    from sorterd.train.evaluate import evaluate_model, short_warning

    model = OnnxModel(resolve_bundle("default", None))
    full = open_dataset(plain_stones)
    auto = evaluate_model(model, full, full.labels, DCFG)
    crops = evaluate_model(model, full, full.labels, DCFG, "processed")
    assert auto.metrics["inputs"] | {"summary": ""} == {"source": "auto", "raw": 60, "processed": 0, "fallback": {},
                                                        "skipped": {}, "summary": ""}
    assert crops.metrics["inputs"]["processed"] == 60 and crops.metrics["inputs"]["raw"] == 0
    assert auto.metrics["n_asked"] == auto.metrics["n_stones"] == 60 and short_warning(auto.metrics) is None
    # The same stones with their processed crops gone: the same inputs, so the same figures.
    raw = open_dataset(raw_only_copy(plain_stones, tmp_path / "raw"))
    only = evaluate_model(model, raw, raw.labels, DCFG, "raw")
    assert np.array_equal(only.p_color, auto.p_color) and np.array_equal(only.p_clarity, auto.p_clarity)
    assert only.metrics["overall"] == auto.metrics["overall"] and only.metrics["inputs"]["raw"] == 60
    assert "inputs (--crops raw): 60 from raw frames, 0 from processed crops, 0 skipped" in format_text(only.metrics)


def test_a_stone_without_an_input_is_counted_and_said_loudly(plain_stones: Path, tmp_path: Path) -> None:
    from sorterd.train.evaluate import evaluate_model, short_warning

    first = json.loads((plain_stones / "labels.jsonl").read_text().splitlines()[0])
    nowhere = first | {"stone_id": "S000999", "raw_x_mm": 0.2, "raw_y_mm": 0.2}  # no stone lies there
    ds = open_dataset(raw_only_copy(plain_stones, tmp_path / "raw", [nowhere]))
    ev = evaluate_model(OnnxModel(resolve_bundle("default", None)), ds, ds.labels, DCFG)
    m = ev.metrics
    assert (m["n_asked"], m["n_stones"]) == (61, 60) and "S000999" not in {lab.stone_id for lab in ev.labels}
    [(why, n)] = m["inputs"]["skipped"].items()
    assert n == 1 and why.startswith("not found: no object within")
    short = short_warning(m)
    assert short is not None and short.startswith("judged only 60 of the 61 stones asked: 1 got no input with "
                                                  "--crops auto and are not in these figures")
    assert "S000999" in short
    assert format_text(m).startswith(f"WARNING: {short}\n")


def test_sizes_of_a_raw_only_dataset_are_measured_on_the_cut_input(plain_stones: Path, tmp_path: Path) -> None:
    """No size_mm and no crop to measure: the backlit half of the stone's input, at the input's scale."""
    ds = open_dataset(raw_only_copy(plain_stones, tmp_path / "raw", drop=("size_mm",)))
    got = predict(OnnxModel(resolve_bundle("default", None)), ds, ds.labels)
    true = [lab.size_mm for lab in open_dataset(plain_stones).labels]  # the segmenter's, as sim generate wrote
    assert all(s is not None for s in got.sizes)
    assert np.median(np.abs(np.array(got.sizes) - np.array(true))) < 0.1


def test_evaluate_cli_crops_choice_on_a_raw_only_dataset(plain_stones: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from sorterd.cli import main

    first = json.loads((plain_stones / "labels.jsonl").read_text().splitlines()[0])
    root = raw_only_copy(plain_stones, tmp_path / "raw", [first | {"stone_id": "S000999", "raw_x_mm": 0.2}])
    capsys.readouterr()
    assert main(["evaluate", "--data", str(root), "--split", "all", "--crops", "processed"]) == 2
    err = capsys.readouterr().err
    assert "has only raw frames (no images/processed/), so --crops processed has no crops to read: choose " \
           "--crops auto or --crops raw" in err
    args = ["evaluate", "--data", str(root), "--split", "all", "--crops", "raw", "--json", str(tmp_path / "m.json")]
    if _has_matplotlib():
        args += ["--report", str(tmp_path / "rep")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "WARNING: judged only 60 of the 61 stones asked" in err and "WARNING: judged only 60" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["inputs"]["source"] == "raw" and (m["n_asked"], m["n_stones"], m["inputs"]["raw"]) == (61, 60, 60)
    if _has_matplotlib():
        page = (tmp_path / "rep" / "report.html").read_text()
        assert "judged only 60 of the 61 stones asked" in page and "inputs (--crops raw)" in page
    # compare judges OLD on the stones NEW got an input for (skips depend on the frames, not the model)
    assert main(["compare", "default", "default", "--data", str(root), "--split", "all",
                 "--json", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: NEW: judged only 60 of the 61 stones asked" in err and "OLD:" not in err
    c = json.loads((tmp_path / "c.json").read_text())
    assert (c["n_stones"], c["n_asked"], c["inputs"]["raw"]) == (60, 61, 60)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_report_gallery_of_a_raw_only_dataset_shows_the_cut_inputs(plain_stones: Path, tmp_path: Path) -> None:
    from sorterd.train.report import _gallery

    ds = open_dataset(raw_only_copy(plain_stones, tmp_path / "raw"))
    full = open_dataset(plain_stones)
    labels = [lab for lab in ds.labels if lab.classified][:2]
    pc = np.array([onehot((lab.color_index + 1) % 3, 0.99) for lab in labels])
    pk = np.array([onehot(lab.clarity_index, 0.99) for lab in labels])
    rows = _gallery(evaluate(labels, [lab.size_mm for lab in labels], pc, pk, DCFG), ds)
    shown = _gallery(evaluate(labels, [lab.size_mm for lab in labels], pc, pk, DCFG), full)
    # At the simulator's own scale and crop the cut input is its processed crop: the same thumbnails.
    assert [(r["id"], r["backlit"], r["toplit"]) for r in rows] == [(r["id"], r["backlit"], r["toplit"]) for r in shown]
