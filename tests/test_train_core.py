"""Model, training core and bundle export (sorterd.train)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sorterd.cli.compose import load_config
from sorterd.train.export import ExportError, export_bundle, verify_onnx
from sorterd.train.loop import (
    AugmentParams,
    TrainConfig,
    TrainData,
    augment_batch,
    channel_stats,
    combined_class,
    epoch_indices,
    expected_calibration_error,
    fit_temperature,
    predict_logits,
    recalibrate_batchnorm,
    sample_weights,
    to_unit,
    train,
)
from sorterd.train.mobilenet import MobileNetV3Small, count_parameters

SIZE = 128
# Toplit body colours (R,G,B) per colour class and backlit transmission per clarity class.
TOPLIT_RGB = np.array([[30, 60, 200], [150, 170, 230], [15, 20, 60]], dtype=np.float32)
BACKLIT_LEVEL = np.array([230, 130, 20], dtype=np.float32)


def synthetic_stones(n: int, seed: int, size: int = SIZE) -> TrainData:
    """Discs on a lit panel: colour class sets the toplit RGB, clarity the backlit level."""
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 3, n)
    clarity = rng.integers(0, 3, n)
    yy, xx = np.mgrid[:size, :size] * (SIZE / size)
    centre = rng.integers(44, 84, (n, 2))
    radius = rng.integers(20, 35, n)
    disc = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
            < radius[:, None, None] ** 2)[:, None]
    backlit = np.where(disc, BACKLIT_LEVEL[clarity][:, None, None, None], 240.0)
    toplit = np.where(disc, TOPLIT_RGB[color][:, :, None, None], 10.0)
    img = np.concatenate([np.broadcast_to(backlit, (n, 3, size, size)), toplit], axis=1)
    img = img + rng.normal(0.0, 8.0, img.shape)
    return TrainData(np.clip(img, 0, 255).astype(np.uint8), color, clarity)


def blocky_pattern(n: int, seed: int) -> torch.Tensor:
    """n x 3 x 128 x 128 random colours in 8-pixel blocks (misalignment is obvious)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=gen)
    return small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5])
def test_forward_returns_color_and_clarity_logits(width: float) -> None:
    model = MobileNetV3Small(width_mult=width).eval()
    with torch.no_grad():
        color, clarity = model(torch.randn(2, 6, SIZE, SIZE))
    assert color.shape == (2, 3) and clarity.shape == (2, 3)


def test_backbone_is_torchvision_mobilenet_v3_small() -> None:
    # torchvision mobilenet_v3_small has 2,542,856 parameters; its classifier is
    # Linear(576, 1024) + Linear(1024, 1000).  Same trunk => same count.
    trunk = count_parameters(MobileNetV3Small(in_channels=3).backbone_parameters())
    assert trunk + (576 * 1024 + 1024) + (1024 * 1000 + 1000) == 2_542_856


def test_parameter_count_and_head_backbone_split() -> None:
    model = MobileNetV3Small()
    total = count_parameters(model.parameters())
    assert 1.0e6 < total < 1.2e6  # 927k trunk (6-ch stem) + 149k dual head
    head = {id(p) for p in model.head_parameters()}
    backbone = {id(p) for p in model.backbone_parameters()}
    assert not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}
    assert count_parameters(MobileNetV3Small(width_mult=0.5).parameters()) < total / 2


# --------------------------------------------------------------------------- augmentation


def test_geometry_is_identical_for_backlit_and_toplit() -> None:
    pattern = blocky_pattern(16, seed=1)
    x = torch.cat([pattern, pattern], dim=1)
    geometry_only = AugmentParams(p_noise=0.0, p_brightness_contrast=0.0, p_erase=0.5)
    out = augment_batch(x, torch.Generator().manual_seed(2), geometry_only)
    assert torch.allclose(out[:, :3], out[:, 3:], atol=1e-6)
    assert (out - x).abs().mean() > 0.1  # it did transform


def test_halves_stay_aligned_with_all_augmentations_on() -> None:
    pattern = blocky_pattern(16, seed=3)
    x = torch.cat([pattern, pattern], dim=1)
    out = augment_batch(x, torch.Generator().manual_seed(4))
    for sample in out:
        assert correlation(sample[:3], sample[3:]) > 0.9
    # A half-block misregistration would already be obvious to this measure.
    shifted = torch.roll(out[:, 3:], shifts=4, dims=3)
    assert correlation(out[0, :3], shifted[0]) < 0.6


def test_augmentation_never_changes_hue() -> None:
    backlit, toplit = (0.80, 0.85, 0.90), (0.10, 0.20, 0.60)
    x = torch.tensor(backlit + toplit).view(1, 6, 1, 1).repeat(32, 1, SIZE, SIZE)
    every_time = AugmentParams(p_brightness_contrast=1.0, p_noise=1.0, p_erase=1.0)
    out = augment_batch(x, torch.Generator().manual_seed(5), every_time)
    kept = (out != 0).any(dim=1, keepdim=True)  # erased pixels are 0 in all channels
    level = ((out * kept).sum(dim=(2, 3)) / kept.sum(dim=(2, 3))).view(32, 2, 3)
    for half, rgb in enumerate((backlit, toplit)):
        ref = torch.tensor(rgb)
        got = level[:, half]
        assert torch.all((got / ref - 1).abs() <= 0.05 + 0.01)  # brightness ±5 % at most
        ratios = got / got[:, 2:3]
        assert torch.allclose(ratios, ref / ref[2], rtol=0.01)  # R:G:B unchanged


def test_brightness_jitter_above_five_percent_is_refused() -> None:
    with pytest.raises(ValueError, match=r"AugmentParams.max_brightness=0.1: .* 0.0..0.05"):
        AugmentParams(max_brightness=0.1)


# --------------------------------------------------------------------------- sampling


def test_weighted_sampling_oversamples_the_rare_class() -> None:
    rng = np.random.default_rng(6)
    combined = rng.integers(0, 9, 2000)
    combined[combined == 6] = 0
    combined[:20] = 6  # inky + transparent: 1 % of the data
    color, clarity = combined // 3, combined % 3
    weights = sample_weights(color, clarity)
    assert weights.mean() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(7)
    drawn = torch.cat([epoch_indices(weights, gen) for _ in range(10)]).numpy()
    share = np.mean(combined_class(color, clarity)[drawn] == 6)
    assert share == pytest.approx(1 / 9, abs=0.015)


# --------------------------------------------------------------------------- training


def test_training_learns_a_separable_synthetic_task() -> None:
    lines: list[str] = []
    cfg = TrainConfig(epochs_heads=1, epochs_full=5, batch_size=16, width_mult=0.5,
                      lr_heads=3e-3, lr_backbone=2e-3, patience=10, seed=0)
    # 64 x 64 rather than 128 x 128 keeps this test at a few seconds on 2 cores.
    result = train(synthetic_stones(200, seed=0, size=64), synthetic_stones(90, seed=1, size=64),
                   cfg, progress=lines.append)
    best = result.history[result.best_epoch - 1]
    # Chance is 1/3 (sd 0.05 on 90 stones); from scratch, 6 short epochs.
    assert min(best.val_color_acc, best.val_clarity_acc) > 0.55
    assert best.val_color_acc + best.val_clarity_acc > 1.3
    assert result.epochs_run == len(result.history) == 6
    assert [h.phase for h in result.history] == ["heads"] + ["full"] * 5
    assert result.history[0].lr_backbone == 0.0
    assert len(result.mean) == len(result.std) == 6
    assert not result.model.training
    assert any(line.startswith("epoch 1/6 heads batch 1/13 loss ") for line in lines)
    assert any(" done " in line and "val_color_acc" in line for line in lines)
    json.dumps(result.summary())


def test_init_state_of_another_width_is_refused() -> None:
    state = MobileNetV3Small(width_mult=0.5).state_dict()
    data = synthetic_stones(4, seed=2)
    with pytest.raises(ValueError, match="init_state does not fit MobileNetV3Small"):
        train(data, data, TrainConfig(width_mult=1.0, epochs_full=1), init_state=state)


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig.epochs_full=-1: must be an integer"):
        TrainConfig(epochs_full=-1)
    with pytest.raises(ValueError, match=r"TrainConfig.std=.*6 numbers"):
        TrainConfig(std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"TrainData.x: expected shape N x 6"):
        TrainData(np.zeros((2, 3, 8, 8), np.uint8), np.zeros(2, int), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"TrainData.clarity: labels must be in 0..2"):
        TrainData(np.zeros((2, 6, 8, 8), np.uint8), np.zeros(2, int), np.array([0, 3]))


def test_channel_stats_match_numpy() -> None:
    x = synthetic_stones(8, seed=3).x
    mean, std = channel_stats(x, chunk=3)
    ref = x.astype(np.float64) / 255
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3)))
    assert np.allclose(std, ref.std(axis=(0, 2, 3)))


def test_predict_logits_matches_the_model_and_keeps_its_mode() -> None:
    model = MobileNetV3Small(width_mult=0.5)
    data = synthetic_stones(5, seed=4)
    mean, std = channel_stats(data.x)
    recalibrate_batchnorm(model, data.x, mean, std, batch_size=5)
    color, clarity = predict_logits(model, data.x, mean, std, batch_size=2)
    assert model.training
    model.eval()
    x = (to_unit(data.x) - torch.tensor(mean).view(1, 6, 1, 1)) / torch.tensor(std).view(1, 6, 1, 1)
    with torch.no_grad():
        ref_color, ref_clarity = model(x)
    assert np.allclose(color, ref_color.numpy(), atol=1e-5)
    assert np.allclose(clarity, ref_clarity.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(8)
    calibrated = rng.normal(0.0, 2.0, (20000, 3))
    p = np.exp(calibrated) / np.exp(calibrated).sum(axis=1, keepdims=True)
    labels = (rng.random((20000, 1)) > p.cumsum(axis=1)).sum(axis=1)
    assert fit_temperature(calibrated * true_t, labels) == pytest.approx(true_t, rel=0.05)


def test_ece_is_near_zero_for_calibrated_and_large_for_overconfident_probs() -> None:
    rng = np.random.default_rng(9)
    probs = rng.dirichlet([1.0, 1.0, 1.0], 20000)
    labels = (rng.random((20000, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    assert expected_calibration_error(probs, labels) < 0.02
    overconfident = np.eye(3)[probs.argmax(axis=1)] * 0.98 + 0.01 / 1.5
    assert expected_calibration_error(overconfident, labels) > 0.2


# --------------------------------------------------------------------------- export


def trained_looking_model() -> MobileNetV3Small:
    """A small model whose BatchNorm statistics are not the trivial 0/1."""
    torch.manual_seed(10)
    model = MobileNetV3Small(width_mult=0.5)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 6, SIZE, SIZE))
    return model.eval()


def test_export_bundle_round_trip(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = trained_looking_model()
    mean, std = [0.5, 0.4, 0.3, 0.2, 0.2, 0.3], [0.2, 0.2, 0.25, 0.1, 0.1, 0.15]
    out = export_bundle(
        model, tmp_path / "v007", version="v007", mean=mean, std=std, crop_mm=6.4,
        temperatures={"color": 1.3}, metrics={"val_color_acc": 0.9}, training={"epochs": 3},
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == {"format", "version", "created", "classes", "input", "outputs",
                             "temperature", "onnx_sha256", "metrics", "training"}
    assert manifest["format"] == "sorterd-model/1" and manifest["version"] == "v007"
    assert manifest["created"].endswith("Z")
    assert manifest["classes"] == {"color": ["blue", "light", "inky"],
                                   "clarity": ["transparent", "translucent", "opaque"]}
    assert manifest["input"] == {
        "name": "input", "size": [128, 128], "layout": "NCHW", "dtype": "float32",
        "channel_order": ["backlit_R", "backlit_G", "backlit_B",
                          "toplit_R", "toplit_G", "toplit_B"],
        "scale": 1 / 255, "mean": mean, "std": std, "crop_mm": 6.4,
    }
    assert manifest["outputs"] == {"color": "color_logits", "clarity": "clarity_logits",
                                   "kind": "logits"}
    assert manifest["temperature"] == {"color": 1.3, "clarity": 1.0}
    assert manifest["metrics"] == {"val_color_acc": 0.9} and manifest["training"] == {"epochs": 3}
    onnx_bytes = (out / "model.onnx").read_bytes()
    assert manifest["onnx_sha256"] == hashlib.sha256(onnx_bytes).hexdigest()

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(11).standard_normal((3, 6, SIZE, SIZE)).astype(np.float32)
    got = session.run(["color_logits", "clarity_logits"], {"input": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g - e.numpy()).max() < 1e-4
    assert not model.training  # export works on a copy


def test_export_refuses_bad_temperatures(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad key 'colour': valid keys are \['color', 'clarity'\]"):
        export_bundle(MobileNetV3Small(width_mult=0.5), tmp_path, version="v001",
                      mean=[0.5] * 6, std=[0.2] * 6, crop_mm=6.4, temperatures={"colour": 1.0},
                      metrics=None, training=None)
    assert not (tmp_path / "manifest.json").exists()


def test_verify_onnx_detects_a_mismatch(tmp_path: Path) -> None:
    model = trained_looking_model()
    export_bundle(model, tmp_path, version="v001", mean=[0.5] * 6, std=[0.2] * 6,
                  crop_mm=6.4, temperatures=None, metrics=None, training=None)
    with torch.no_grad():
        model.head.color.bias.add_(0.01)
    with pytest.raises(ExportError, match=r"differs from torch by"):
        verify_onnx(model, tmp_path / "model.onnx")
    assert math.isfinite(verify_onnx(trained_looking_model(), tmp_path / "model.onnx"))


def test_averaged_model_keeps_batchnorm_statistics_without_recalibration() -> None:
    """ema_epochs with bn_recalibration=0: the averaged model must not keep its initial BN statistics."""
    cfg = TrainConfig(epochs_heads=0, epochs_full=1, batch_size=16, width_mult=0.5, seed=0, ema_epochs=1.0,
                      bn_recalibration=0)
    result = train(synthetic_stones(48, seed=0, size=64), synthetic_stones(16, seed=1, size=64), cfg)
    norms = [m for m in result.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) > 0 for m in norms)
    assert not torch.allclose(norms[0].running_var, torch.ones_like(norms[0].running_var))


# --------------------------------------------------------------------------- sorterd train (fit)


REPO = Path(__file__).resolve().parent.parent


def bundle_without_weights_hash(tmp_path: Path) -> Path:
    """The shipped bundle, its manifest no longer pinning weights.pt (as a hand-made bundle's)."""
    import shutil

    bundle = tmp_path / "old"
    shutil.copytree(REPO / "models" / "default", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["training"]["weights_sha256"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_fine_tuning_from_bad_weights_names_the_file(tmp_path: Path) -> None:
    from sorterd.data.bundle import ModelError
    from sorterd.train.job import _previous_bundle

    bundle = bundle_without_weights_hash(tmp_path)
    weights = bundle / "weights.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=rf"{re.escape(str(weights))}: not a weights file written by `sorterd train` "
                                         r"\(UnpicklingError"):
        _previous_bundle(bundle)
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"{re.escape(str(weights))}: not a weights file .*\(EOFError: empty or truncated\)"):
        _previous_bundle(bundle)
    torch.save(MobileNetV3Small(width_mult=0.5).state_dict(), weights)  # another architecture
    path_on = json.loads((bundle / "manifest.json").read_text())["training"]["config"].get("stats_path", False)
    with pytest.raises(ModelError, match=rf"{re.escape(str(weights))}: does not fit the manifest's model \(width 1.0, "
                                         rf"stone_stats True, stats_path {path_on}\)"):
        _previous_bundle(bundle)
    torch.save([torch.zeros(3)], weights)
    with pytest.raises(ModelError, match=rf"{re.escape(str(weights))}: holds a list, not a state dict of tensors"):
        _previous_bundle(bundle)


def small_dataset(root: Path) -> Path:
    """Two simulated lots: 40 stones of LOT-2026-001, 16 of LOT-2026-006."""
    from datetime import date

    from sorterd import config
    from sorterd.sim.generate import GenerateOptions, generate
    from sorterd.sim.lots import LOTS

    cfg = load_config(config.sim_config_path())
    generate(cfg, GenerateOptions(root, 40, LOTS["thai-mixed"], seed=1, day=date(2026, 3, 2)))
    generate(cfg, GenerateOptions(root, 16, LOTS["anakie-dark"], seed=2, day=date(2026, 3, 2)))
    return root


def test_fine_tuning_refuses_a_test_split_the_old_model_learnt_from(tmp_path: Path) -> None:
    from sorterd.data.dataset import DatasetError, open_dataset
    from sorterd.train.job import _check_test_unseen, _Previous
    from sorterd.train.splits import make_splits, write_splits

    ds = open_dataset(small_dataset(tmp_path / "ds"))
    old = make_splits(ds.labels, version="v001", seed=0)
    assert old.test_lots == ["LOT-2026-006"]
    folder = write_splits(ds, old)

    def previous(data_dir: str) -> _Previous:
        training = {"data": {"dir": data_dir, "lots": ["LOT-2026-001", "LOT-2026-006"]},
                    "splits": {"dir": str(folder.resolve()), "lot_holdout": True, "test_lots": ["LOT-2026-006"]}}
        return _Previous(tmp_path / "old", {"training": training}, {}, 1.0, True, False, [0.5] * 6, [0.2] * 6, 6.4)

    here = str(ds.root.resolve())
    _check_test_unseen(previous(here), ds, make_splits(ds.labels, version="v002", test_lots=["LOT-2026-006"]))
    # The lot it trained on, held out "for test" now: its stones are in the old train and val lists.
    with pytest.raises(DatasetError, match=r"old: was trained on 40 of the 40 test stones \(lots LOT-2026-001\); "
                                           r".*optimistic \(§7\.4\)\. Hold out lots it never saw with --test-lots"):
        _check_test_unseen(previous(here), ds, make_splits(ds.labels, version="v002", test_lots=["LOT-2026-001"]))
    # Trained on another copy of the lots: refused by lot, the stones being unknown.
    with pytest.raises(DatasetError, match=r"was trained on 40 of the 40 test stones \(lots LOT-2026-001\)"):
        _check_test_unseen(previous("/elsewhere"), ds,
                           make_splits(ds.labels, version="v002", test_lots=["LOT-2026-001"]))


@pytest.mark.slow
def test_a_reused_split_snapshot_is_the_one_the_bundle_records(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--splits v001 for model v002: manifest and log name v001, so `sorterd evaluate` finds its test split."""
    from sorterd.cli import main
    from sorterd.data.dataset import open_dataset
    from sorterd.train.job import FitOptions, fit
    from sorterd.train.splits import make_splits, write_splits

    ds = open_dataset(small_dataset(tmp_path / "ds"))
    write_splits(ds, make_splits(ds.labels, version="v001", seed=0))
    cfg = TrainConfig(epochs_heads=1, epochs_full=1, batch_size=16, width_mult=0.25, threads=2)
    out = tmp_path / "models" / "b"
    outcome = fit(FitOptions(data=ds.root, out=out, version="v002", splits="v001", config=cfg), say=lambda s: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "v002" and outcome.version == "v002"
    assert manifest["training"]["splits"]["version"] == "v001"
    assert Path(manifest["training"]["splits"]["dir"]) == (ds.root / "splits" / "v001").resolve()
    log = [json.loads(line) for line in (tmp_path / "models" / "model_log.jsonl").read_text().splitlines()]
    assert log[-1]["version"] == "v002" and log[-1]["splits"] == "v001"
    assert sorted(p.name for p in (ds.root / "splits").iterdir()) == ["v001"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(ds.root)]) == 0
    assert "[test split v001]" in capsys.readouterr().out


def test_verify_onnx_judges_the_difference_by_the_logits_scale(tmp_path: Path) -> None:
    """A fine-tuned model's logits on the random probe reach thousands; float32 rounding there is
    not a broken export (the retrain runner's fine-tunes were refused at 3e-4 absolute)."""
    model = trained_looking_model()
    with torch.no_grad():
        for head in (model.head.color, model.head.clarity):
            head.weight.mul_(1000.0)
            head.bias.mul_(1000.0)
    export_bundle(model, tmp_path, version="v001", mean=[0.5] * 6, std=[0.2] * 6,
                  crop_mm=6.4, temperatures=None, metrics=None, training=None)
    assert verify_onnx(model, tmp_path / "model.onnx") <= 1e-4
    with torch.no_grad():
        model.head.color.bias.add_(50.0)  # a real difference at that scale
    with pytest.raises(ExportError, match=r"differs from torch by"):
        verify_onnx(model, tmp_path / "model.onnx")
