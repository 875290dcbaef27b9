"""The trainer's command line: sim generate -> train -> evaluate -> compare, and its errors."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.cli import build_parser, main
from sorterd.train.loop import StepEvent
from sorterd.train.progress import ProgressBar

REPO = Path(__file__).resolve().parent.parent
TINY = ["--epochs-heads", "1", "--epochs", "1", "--width", "0.25", "--batch-size", "16", "--threads", "2"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- without torch ----------------------------------------------------------------------------------


def test_cli_imports_without_torch_and_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now fails, as on a sorter without the extra\n"
        "from sorterd.cli import build_parser, main\n"
        "build_parser()\n"
        "assert 'matplotlib' not in sys.modules\n"
        "sys.exit(main(['train', '--data', 'nowhere', '--out', 'b']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 5, res.stderr
    assert "sorterd train: needs PyTorch" in res.stderr and "pip install -e '.[train]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_parser_has_the_trainer_commands() -> None:
    p = build_parser()
    a = p.parse_args(["sim", "generate", "--out", "d", "--stones", "5", "--lot", "thai-mixed", "--seed", "3"])
    assert (a.stones, a.lot, a.seed) == (5, "thai-mixed", 3)
    a = p.parse_args(["train", "--data", "d", "--out", "b", "--from", "old", "--test-lots", "A,B"])
    assert a.from_bundle == Path("old") and a.test_lots == ["A", "B"]
    a = p.parse_args(["evaluate", "--data", "d", "--split", "all", "--json", "m.json"])
    assert a.model == "default" and a.split == "all"
    a = p.parse_args(["compare", "o", "n", "--data", "d"])
    assert (a.old, a.new, a.split) == ("o", "n", "test")


def test_every_command_judging_a_model_takes_the_same_crops_choice() -> None:
    """train, evaluate and compare: the loader's sources, the loader's default (written out in the parser)."""
    from sorterd.data.samples import DEFAULT_SOURCE, SOURCES

    p = build_parser()
    for args in (["train", "--data", "d", "--out", "b"], ["evaluate", "--data", "d"], ["compare", "o", "n", "--data", "d"]):
        assert p.parse_args(args).crops == DEFAULT_SOURCE
        for source in SOURCES:
            assert p.parse_args([*args, "--crops", source]).crops == source
        with pytest.raises(SystemExit):
            p.parse_args([*args, "--crops", "frames"])


def raw_only_generated(root: Path, capsys: pytest.CaptureFixture[str],
                       lots: tuple[tuple[str, int, int], ...] = (("thai-mixed", 8, 1),)) -> Path:
    """`sim generate` output without images/processed/: whole frames and labels only."""
    for lot, n, seed in lots:
        code, _, err = run_cli(["sim", "generate", "--out", str(root), "--stones", str(n), "--lot", lot,
                                "--seed", str(seed), "--date", "2026-03-02"], capsys)
        assert code == 0, err
    shutil.rmtree(root / "images" / "processed")
    return root


def test_train_on_raw_frames_only_with_crops_processed_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = raw_only_generated(tmp_path / "ds", capsys)
    code, _, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "v1"), "--crops", "processed",
                            "--no-log", *TINY], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"sorterd train: error: {root}: has only raw frames (no images/processed/), so --crops "
                           "processed has no crops to read: choose --crops auto or --crops raw (each input cut from "
                           "its raw frame pair, as the sorter cuts it)")
    assert not (root / "splits").exists() and not (tmp_path / "v1").exists()


def test_unknown_lot_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["sim", "generate", "--out", str(tmp_path), "--stones", "3", "--lot", "mars"], capsys)
    assert code == 2 and "Bad lot 'mars': valid lots are" in err


def test_ctrl_c_in_sim_generate_is_one_line_exit_130_and_says_what_was_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sorterd.data.dataset import open_dataset
    from sorterd.sim import generate

    real, calls = generate._write_stone, []

    def write_then_ctrl_c(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a SIGINT would, between two stones
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(generate, "_write_stone", write_then_ctrl_c)
    code, _, err = run_cli(["sim", "generate", "--out", str(tmp_path), "--stones", "10", "--lot", "thai-mixed",
                            "--date", "2026-02-15"], capsys)
    assert code == 130 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("sorterd sim generate: interrupted: wrote 3 stones S000001..S000003 of ")
    assert "1 session(s) 2026-02-15_001" in line
    assert [lab.stone_id for lab in open_dataset(tmp_path).labels] == ["S000001", "S000002", "S000003"]


# -- errors before any training ----------------------------------------------------------------------


def hand_written(root: Path, n: int = 8) -> Path:
    """n stones in two lots, crops of assorted sizes: a dataset nobody simulated."""
    classes = [("blue", "transparent", (200, 60, 30), 210), ("light", "translucent", (230, 200, 190), 120),
               ("inky", "opaque", (60, 25, 15), 15), ("blue", "opaque", (190, 70, 40), 20)]
    lines = []
    for i in range(n):
        color, clarity, bgr, bright = classes[i % 4]
        side = (96, 150, 128, 80)[i % 4]
        for mode in ("backlit", "toplit"):
            folder = root / "images" / "processed" / mode
            folder.mkdir(parents=True, exist_ok=True)
            img = np.full((side, side, 3), 230 if mode == "backlit" else 118, np.uint8)
            fill = (bright,) * 3 if mode == "backlit" else bgr
            cv2.circle(img, (side // 2 + i % 3, side // 2), side // 4 + i % 5, fill, -1)
            cv2.imwrite(str(folder / f"H{i:03d}.png"), img)
        lines.append(json.dumps({"stone_id": f"H{i:03d}", "color": color, "clarity": clarity,
                                 "lot_id": "LOT-A" if i < n * 3 // 4 else "LOT-B"}))
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda r: _append(r, '{"stone_id": "X1", "color": "blue",'), r"labels\.jsonl:9: not valid JSON"),
    (lambda r: _append(r, '{"stone_id": "X1", "color": "teal", "clarity": "opaque"}'),
     r"labels\.jsonl:9: unknown color 'teal': valid color classes are blue, light, inky"),
    (lambda r: (r / "images" / "processed" / "backlit" / "H003.png").unlink(),
     r"labels\.jsonl:4: stone H003: missing image .*backlit/H003\.png"),
])
def test_train_reports_bad_data_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 damage: object, expected: str) -> None:
    root = hand_written(tmp_path / "ds")
    damage(root)  # type: ignore[operator]
    code, _, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "b"), *TINY], capsys)
    assert code == 2
    assert "Traceback" not in err
    import re

    assert re.search(expected, err), err
    assert not (tmp_path / "b").exists()


def _append(root: Path, line: str) -> None:
    with open(root / "labels.jsonl", "a") as fh:
        fh.write(line + "\n")


def test_fine_tuning_needs_the_trainers_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "old"
    shutil.copytree(REPO / "models" / "default", bundle)
    (bundle / "weights.pt").unlink(missing_ok=True)
    root = hand_written(tmp_path / "ds")
    code, _, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "b"), "--from", str(bundle),
                            *TINY], capsys)
    assert code == 3 and "no weights.pt" in err


def test_an_existing_bundle_is_not_overwritten_by_accident(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(REPO / "models" / "default", tmp_path / "b")
    root = hand_written(tmp_path / "ds")
    code, _, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "b"), *TINY], capsys)
    assert code == 2 and "add --force" in err


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_train_evaluate_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, models = tmp_path / "data", tmp_path / "models"
    for lot, n, seed in (("thai-mixed", 48, 1), ("anakie-dark", 16, 2)):
        code, out, _ = run_cli(["sim", "generate", "--out", str(data), "--stones", str(n), "--lot", lot,
                                "--seed", str(seed), "--date", "2026-03-02"], capsys)
        assert code == 0 and f"wrote {n} stones" in out

    code, out, err = run_cli(["train", "--data", str(data), "--out", str(models / "v1"), "--no-progress", *TINY],
                             capsys)
    assert code == 0, err
    assert "v001 written" in out and "lots LOT-2026-006 held out" in out
    manifest = json.loads((models / "v1" / "manifest.json").read_text())
    assert manifest["version"] == "v001" and manifest["training"]["splits"]["test_lots"] == ["LOT-2026-006"]
    assert set(manifest["temperature"]) == {"color", "clarity"}
    assert set(manifest["training"]["prior_correction"]) == {"color", "clarity"}
    assert {"overall", "cost_weighted", "flagged_rate", "ece"} <= set(manifest["metrics"]["test"])
    assert (models / "v1" / "weights.pt").is_file()
    trained = manifest["training"]["config"]  # v005's head: the statistics' own path, a quarter of the CNN dropped
    assert trained["stone_stats"] and trained["stats_path"] and trained["backbone_dropout"] == 0.25
    assert sorted(p.name for p in (data / "splits").iterdir()) == ["v001"]
    test_ids = (data / "splits" / "v001" / "test.txt").read_text().split()
    assert len(test_ids) == 16

    code, out, err = run_cli(["train", "--data", str(data), "--out", str(models / "v2"), "--from",
                              str(models / "v1"), "--no-progress", *TINY[:4], "--batch-size", "16"], capsys)
    assert code == 0, err
    m2 = json.loads((models / "v2" / "manifest.json").read_text())
    assert m2["version"] == "v002" and m2["training"]["from"] == str(models / "v1")
    assert m2["input"]["mean"] == manifest["input"]["mean"]  # §5.4: the old normalisation is kept
    assert m2["training"]["config"]["stats_path"]  # and its architecture
    assert m2["training"]["splits"]["test_lots"] == ["LOT-2026-006"]  # and the old test lot stays out
    log = [json.loads(line) for line in (models / "model_log.jsonl").read_text().splitlines()]
    assert [e["version"] for e in log] == ["v001", "v002"]
    for key in ("timestamp", "training_samples", "new_samples_since_last", "epochs", "learning_rate",
                "test_accuracy_color", "test_accuracy_clarity", "test_accuracy_combined",
                "cost_weighted_accuracy", "notes"):
        assert key in log[1]  # §5.5
    assert log[1]["notes"] == "fine-tuned from v001" and log[1]["new_samples_since_last"] == 0

    code, out, err = run_cli(["evaluate", "--model", str(models / "v2"), "--data", str(data),
                              "--json", str(tmp_path / "m.json"), "--report", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_stones"] == 16 and m["data"]["split"] == "test" and m["model"]["version"] == "v002"
    assert {"overall", "color", "clarity", "cost_weighted", "flagged_rate", "cut_purity", "cut_recall",
            "per_class", "ece"} <= set(m)
    assert "data:image/png;base64," in (tmp_path / "rep" / "report.html").read_text()

    code, _, err = run_cli(["evaluate", "--model", str(models / "v2"), "--data", str(data), "--split", "all"],
                           capsys)
    assert code == 0 and "figures are optimistic" in err

    code, out, err = run_cli(["compare", str(models / "v1"), str(models / "v2"), "--data", str(data),
                              "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["better"] in ("new", "old", "tie") and c["n_stones"] == 16
    assert c["old"]["version"] == "v001" and c["new"]["version"] == "v002"
    assert "verdict" in out and "cost_weighted" in out


@pytest.mark.slow
def test_hand_written_dataset_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = hand_written(tmp_path / "ds", n=12)
    code, out, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "b"), "--no-log",
                              "--no-progress", *TINY], capsys)
    assert code == 0, err
    assert "lots LOT-B held out" in out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["input"]["crop_mm"] == 6.4
    assert not (tmp_path / "model_log.jsonl").exists()
    code, out, err = run_cli(["evaluate", "--model", str(tmp_path / "b"), "--data", str(root), "--split", "all",
                              "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_stones"] == 12 and m["sizes_unknown"] == 12


@pytest.mark.slow
def test_a_dataset_of_raw_frames_only_trains_and_evaluates_on_its_cut_inputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = raw_only_generated(tmp_path / "ds", capsys, (("thai-mixed", 24, 1), ("anakie-dark", 8, 2)))
    last = json.loads((root / "labels.jsonl").read_text().splitlines()[-1])  # a stone of the test lot ...
    _append(root, json.dumps(last | {"stone_id": "S000999", "raw_x_mm": 0.2, "raw_y_mm": 0.2}))  # ... where none lies
    code, out, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "v1"), "--no-log",
                              "--no-progress", *TINY], capsys)
    assert code == 0, err
    assert "inputs (train): " in out and " 0 from processed crops, 0 skipped" in out
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest["training"]["inputs"]["source"] == "auto"
    test = manifest["metrics"]["test"]
    assert test["inputs"]["source"] == "auto" and test["inputs"]["raw"] == test["n_stones"] == 8
    assert test["n_asked"] == 9 and sum(test["inputs"]["skipped"].values()) == 1
    assert "inputs (--crops auto): 8 from raw frames" in out  # train's own test figures say so too
    assert "WARNING: judged only 8 of the 9 stones asked" in err
    code, out, err = run_cli(["evaluate", "--model", str(tmp_path / "v1"), "--data", str(root), "--crops", "raw",
                              "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    assert "trained on --crops auto inputs and is judged here on --crops raw" in err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["inputs"]["raw"] == m["n_stones"] == 8 and m["n_asked"] == 9 and m["overall"] == test["overall"]
    assert "WARNING: judged only 8 of the 9 stones asked" in err


# -- progress bar --------------------------------------------------------------------------------------


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def events(n: int = 5) -> list[StepEvent]:
    return [StepEvent(1, 2, "heads", i, n, 1.0 / i, 0.5, 0.5) for i in range(1, n + 1)]


def test_progress_bar_updates_one_line_on_a_terminal() -> None:
    s = FakeStream(tty=True)
    bar = ProgressBar(s)
    for e in events():
        bar.step(e)
    bar.line("epoch 1/2 heads done train_loss 1.0")
    bar.close()
    text = s.getvalue()
    assert text.startswith("\r[") and "epoch 1/2 heads batch" in text
    assert text.rstrip("\n").endswith("epoch 1/2 heads done train_loss 1.0")
    assert text.count("\n") == 1  # the live line was cleared, only the epoch line stays


def test_progress_in_a_log_is_periodic_lines() -> None:
    s = FakeStream(tty=False)
    bar = ProgressBar(s, log_every_s=3600)
    for e in events():
        bar.step(e)
        bar.line(f"epoch 1/2 heads batch {e.batch}/5 loss 1.0")  # the trainer's per-batch lines: dropped
    bar.line("epoch 1/2 heads done train_loss 1.0")
    lines = s.getvalue().splitlines()
    assert "\r" not in s.getvalue()
    assert len(lines) == 2 and "batch 1/5" in lines[0] and "done" in lines[1]


# -- prior correction ----------------------------------------------------------------------------------


def test_prior_correction_turns_balanced_sampling_back_into_the_real_mix() -> None:
    import torch

    from sorterd.train.job import apply_prior_correction
    from sorterd.train.loop import prior_correction
    from sorterd.train.mobilenet import MobileNetV3Small

    # 6 blue + 2 inky stones, all translucent: the sampler shows blue and inky equally often.
    color = np.array([0] * 6 + [2] * 2)
    clarity = np.ones(8, dtype=np.int64)
    prior = prior_correction(color, clarity)
    assert prior["color"][0] == pytest.approx(np.log(0.75 / 0.5))
    assert prior["color"][2] == pytest.approx(np.log(0.25 / 0.5))
    assert prior["clarity"][1] == pytest.approx(0.0)
    model = MobileNetV3Small(width_mult=0.25).eval()
    x = torch.zeros(1, 6, 32, 32)
    with torch.no_grad():
        before = model(x)[0]
        apply_prior_correction(model, prior)
        after = model(x)[0]
    assert torch.allclose(after - before, torch.as_tensor(prior["color"], dtype=torch.float32), atol=1e-6)


def test_moving_average_of_the_weights_is_what_training_returns() -> None:
    import torch

    from sorterd.train.job import default_config
    from sorterd.train.loop import TrainConfig, TrainData, _Run, _start_run, _update_ema, train

    rng = np.random.default_rng(0)
    n = 48
    color, clarity = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.zeros((n, 6, 32, 32), np.uint8)
    x[:, :3] = (np.array([230, 130, 20])[clarity])[:, None, None, None]
    x[:, 3:] = (np.array([60, 160, 15])[color])[:, None, None, None]
    data = TrainData(x, color, clarity)
    cfg = TrainConfig(epochs_heads=0, epochs_full=1, batch_size=8, width_mult=0.25, ema_epochs=1.0,
                      bn_recalibration=16, augment=False, threads=1)
    run: _Run = _start_run(data, data, cfg, None, None)
    assert run.ema is not None and run.ema_decay == pytest.approx(1 - 1 / 6)  # 6 batches per epoch
    before = [p.detach().clone() for p in run.ema.parameters()]
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)
    _update_ema(run)  # first update: d = 2/11 of the old average, 9/11 of the live weights
    after = list(run.ema.parameters())
    assert torch.allclose(after[0], before[0] * 2 / 11 + (before[0] + 1.0) * 9 / 11, atol=1e-6)
    result = train(data, data, cfg)
    assert result.history[-1].val_color_acc >= 0.3  # trains and validates the averaged model
    assert default_config().ema_epochs == 2.0 and default_config(True).epochs_full == 8


def test_stone_stats_see_the_stone_against_its_background(tmp_path: Path) -> None:
    import torch

    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.export import export_bundle
    from sorterd.train.mobilenet import MobileNetV3Small

    model = MobileNetV3Small(width_mult=0.25, stone_stats=True).eval()
    assert model.stats is not None and model.stats.out_features == 13
    assert {id(p) for p in model.stats.parameters()} <= {id(p) for p in model.head_parameters()}
    x = torch.zeros(2, 6, 128, 128)
    x[:, 3:, 44:84, 44:84] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]  # a stone in the toplit half
    x[1, 3:, 44:84, 44:84] *= -1.0  # the other one darker than the background
    with torch.no_grad():
        f = model.stats(x)
    assert torch.allclose(f[:, 6:12], torch.zeros(2, 6))  # corners: background
    assert f[0, 5] > 2.5 and f[1, 5] < -2.5  # the masked mean is the stone's own value
    assert torch.allclose(f[:, 12], torch.log(torch.tensor(1600 / 128**2 + 1e-3)), atol=0.1)  # soft mask
    export_bundle(model, tmp_path / "b", version="v001", mean=[0.5] * 6, std=[0.25] * 6, crop_mm=6.4)
    crops = np.full((1, 128, 128, 6), 128, np.uint8)
    preds, _ = OnnxModel(tmp_path / "b").predict(crops)
    assert preds[0].p_color.shape == (3,)


def test_evaluating_on_another_dataset_asks_for_split_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = hand_written(tmp_path / "ds")
    code, _, err = run_cli(["evaluate", "--data", str(root)], capsys)
    assert code == 2 and "has no split snapshot" in err and "--split all" in err
    code, out, err = run_cli(["evaluate", "--data", str(root), "--split", "all"], capsys)
    assert code == 0 and "stones 8 (8 classified, 0 non-gem)" in out


def test_stats_path_carries_a_prediction_of_its_own_and_exports(tmp_path: Path) -> None:
    """--stats-path: the StoneStats reach the logits linearly (zero at start, so the first forward
    is the plain head's); with the CNN features zeroed the statistics alone still move the logits;
    backbone dropout acts only in training; the graph matches torch."""
    import torch

    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.export import export_bundle
    from sorterd.train.loop import TrainConfig
    from sorterd.train.mobilenet import MobileNetV3Small

    with pytest.raises(ValueError, match="needs stone_stats"):
        MobileNetV3Small(width_mult=0.25, stats_path=True)
    with pytest.raises(ValueError, match="needs stone_stats"):
        TrainConfig(stats_path=True)
    with pytest.raises(ValueError, match="backbone_dropout"):
        TrainConfig(stone_stats=True, backbone_dropout=0.95)
    torch.manual_seed(0)
    model = MobileNetV3Small(width_mult=0.25, stone_stats=True, stats_path=True, backbone_dropout=0.5)
    head = model.head
    assert head.color_direct is not None and head.clarity_direct is not None
    assert float(head.color_direct.weight.detach().abs().sum()) == 0.0  # starts as the plain head
    assert {id(p) for p in head.color_direct.parameters()} <= {id(p) for p in model.head_parameters()}
    with torch.no_grad():
        head.color_direct.weight.fill_(0.5)
    x = torch.zeros(2, 6, 128, 128)
    x[:, 3:, 44:84, 44:84] = 2.0
    x[1, 3:, 44:84, 44:84] = -2.0  # a darker stone: other statistics
    feats = model.eval().head_features(x)
    no_cnn = feats.clone()
    no_cnn[:, :-13] = 0.0
    with torch.no_grad():
        c = head(no_cnn)[0]
        direct = head.color_direct(no_cnn[:, -13:])
    assert not torch.allclose(direct[0], direct[1])  # the statistics alone tell the stones apart
    assert torch.allclose(c - direct, head.color(head.shared(no_cnn)), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model.head_features(x), model.head_features(x))  # eval: no dropout
        model.train()
        torch.manual_seed(1)
        dropped = model.head_features(torch.randn(64, 6, 32, 32))
        model.eval()
    zero_rows = int((dropped[:, :-13].abs().sum(dim=1) == 0).sum())
    assert 16 <= zero_rows <= 48  # about half the samples trained without their CNN features
    export_bundle(model, tmp_path / "b", version="v001", mean=[0.5] * 6, std=[0.25] * 6, crop_mm=6.4)
    crops = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 6), dtype=np.uint8)
    preds, _ = OnnxModel(tmp_path / "b").predict(crops)
    t = (torch.as_tensor(crops).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    with torch.no_grad():
        ref = torch.softmax(model(t)[0], dim=1).numpy()
    assert np.allclose(np.stack([p.p_color for p in preds]), ref, atol=1e-3)
