"""`sorterd train`: from a §7.1 dataset to a calibrated, evaluated model bundle.

    1. read and validate the dataset (`sorterd.data.dataset`): bad lines, missing
       images and unknown classes stop here, naming file and line;
    2. remove duplicates by image hash (§3.5) and split -- whole lots held
       out for test (§7.3, §7.4) -- snapshotted in DIR/splits/<version>/
       (or reuse a snapshot with ``splits``);
    3. train the dual-head MobileNetV3-Small (`sorterd.train.loop`), by
       default with the stone-vs-background colour statistics beside the CNN
       features (`StoneStats`): inverse-frequency sampling (§1.3), only
       §4.1/§4.2 augmentations, heads first then end to end with early
       stopping on validation (§9.4), judged on a moving average of the
       weights; ``from_bundle`` fine-tunes a previous bundle, keeping its
       mean/std, architecture and test lots (§5.4);
    4. fold the prior correction into the heads (the sampler's equal class mix
       back to the training lots' real one), then fit one temperature per head
       on validation (§5.2 gates mean what they say) and measure ECE before
       and after;
    5. export the bundle (ONNX + manifest + ``weights.pt`` for later
       fine-tuning), evaluate it on the test split through onnxruntime
       exactly as `sorterd evaluate` does, and put the figures in the
       manifest;
    6. append a §5.5 entry to the model log.

The bundle is written next to its final place and swapped in at the end, so
a failed or interrupted run never leaves half a bundle behind.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sorterd.config import DecisionConfig
from sorterd.data.bundle import INPUT_SIZE, ModelError, read_manifest, sha256_file, softmax
from sorterd.data.dataset import (
    DEFAULT_CROP_MM,
    Dataset,
    DatasetError,
    StoneLabel,
    open_dataset,
)
from sorterd.data.files import write_json_atomic
from sorterd.data.samples import DEFAULT_SOURCE, INPUT_CACHE, SampleReport, check_source, dedupe, load_samples
from sorterd.domain import CLASSES
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.train.evaluate import Evaluation, evaluate_model
from sorterd.train.export import export_bundle
from sorterd.train.loop import (
    StepHook,
    TrainConfig,
    TrainData,
    TrainResult,
    combined_class,
    fit_temperature,
    load_state,
    predict_logits,
    train,
)
from sorterd.train.mobilenet import MobileNetV3Small
from sorterd.train.ood import OodFit, fit_ood
from sorterd.train.splits import Splits, make_splits, read_splits, snapshot_ids, write_splits
from sorterd.train.temperature import expected_calibration_error

WEIGHTS_FILE = "weights.pt"
# `sorterd train` defaults: from scratch, and (second value) fine-tuning with --from (§5.4).
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "epochs_heads": (2, 1),
    "epochs_full": (14, 8),
    "lr_heads": (1e-3, 3e-4),
    "lr_backbone": (3e-4, 1e-4),
    "ema_epochs": (2.0, 2.0),
    "stone_stats": (True, True),
    # The statistics' own path to the logits and the CNN features of a quarter of the samples dropped:
    # v005 (models/README.md). With --from, the path follows the previous bundle's architecture.
    "stats_path": (True, True),
    "backbone_dropout": (0.25, 0.25),
    "prior_correction": (True, True),
}
MIN_PER_CLASS = 50  # §1.3 item 4: below this a class is learnt from noise
_VERSION = re.compile(r"^v(\d+)$")

Say = Callable[[str], None]


def default_config(fine_tune: bool = False, **given: Any) -> TrainConfig:
    """The TrainConfig `sorterd train` uses; `given` overrides (None values are ignored)."""
    values = {k: v[1] if fine_tune else v[0] for k, v in DEFAULTS.items()}
    values["threads"] = os.cpu_count() or 1
    values.update({k: v for k, v in given.items() if v is not None})
    return TrainConfig(**values)


@dataclass
class FitOptions:
    data: Path
    out: Path
    from_bundle: Path | None = None
    version: str | None = None
    splits: str | None = None  # reuse DIR/splits/<splits> instead of making new ones
    test_lots: list[str] | None = None
    log_path: Path | None = None  # None = <out's parent>/model_log.jsonl
    write_log: bool = True
    force: bool = False
    crop_mm: float | None = None
    crops: str = DEFAULT_SOURCE  # sorterd.data.samples.SOURCES: raw frames where linked, else processed crops
    notes: str = ""
    command: str = ""
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FitOutcome:
    bundle: Path
    version: str
    splits: Splits
    result: TrainResult
    temperatures: dict[str, float]
    test: Evaluation | None
    log_entry: dict[str, Any]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # prepare, train, finish (s)


def fit(opts: FitOptions, say: Say = print, on_step: StepHook | None = None) -> FitOutcome:
    started = time.perf_counter()
    _check_out(opts)
    asked = asked_version(opts)  # before any data is read: a contradiction costs nothing
    ds = open_dataset(opts.data)
    check_source(ds, opts.crops)  # before any split is written
    previous = _previous_bundle(opts.from_bundle)
    version = asked or next_version(opts, ds, previous)
    crop_mm = _crop_mm(ds, opts, previous)
    splits = _splits(ds, opts, version, previous, crop_mm, say)
    try:
        if previous is not None:
            _check_test_unseen(previous, ds, splits)
        return _fit_with_splits(opts, ds, previous, version, crop_mm, splits, say, on_step, started)
    except BaseException:
        # No model came of this snapshot: take it back, so the version number is free again.
        if not opts.splits and not _published(opts.out, version):
            shutil.rmtree(ds.root / "splits" / version, ignore_errors=True)
        raise


def _published(bundle: Path, version: str) -> bool:
    try:
        return bool(json.loads((bundle / "manifest.json").read_text()).get("version") == version)
    except (OSError, ValueError):
        return False


def _fit_with_splits(opts: FitOptions, ds: Dataset, previous: _Previous | None, version: str, crop_mm: float,
                     splits: Splits, say: Say, on_step: StepHook | None, started: float) -> FitOutcome:
    inputs: dict[str, SampleReport] = {}
    train_set, val_set = (_arrays(ds, splits, name, crop_mm, opts.crops, inputs) for name in ("train", "val"))
    for name, report in inputs.items():
        say(report.line(name))
    _warn_small_classes(train_set[0], say)
    prepared = time.perf_counter()
    cfg = _config(opts.config, previous)
    say(f"training {version}: {len(train_set[0])} stones, validating on {len(val_set[0])} "
        f"({cfg.epochs_heads} heads-only + up to {cfg.epochs_full} end-to-end epochs, width {cfg.width_mult})")
    result = train(train_set[1], val_set[1], cfg, progress=say,
                   init_state=previous.state if previous else None, on_step=on_step)
    trained = time.perf_counter()
    raw_state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    prior = result.prior_correction
    if prior is not None:
        apply_prior_correction(result.model, prior)
    temps, calib = _calibrate(result, val_set[1])
    say(f"temperatures colour {temps['color']:.3f} clarity {temps['clarity']:.3f}; validation ECE "
        f"colour {calib['val_ece_before']['color']:.4f} -> {calib['val_ece_after']['color']:.4f}, "
        f"clarity {calib['val_ece_before']['clarity']:.4f} -> {calib['val_ece_after']['clarity']:.4f}")
    ood = fit_ood(result.model, train_set[1].x, combined_class(train_set[1].color, train_set[1].clarity),
                  val_set[1].x, result.mean, result.std)
    say(f"out-of-distribution gate: fitted on {len(train_set[0])} training stones; "
        f"{ood.val_rate:.1%} of validation stones over its limit")
    staging = _staging_dir(opts.out)
    try:
        training = _training_record(opts, ds, splits, result, previous, calib, train_set[0])
        training["inputs"] = {"source": opts.crops, **{name: r.as_dict() for name, r in inputs.items()}}
        training["prior_correction"] = ({head: [round(float(v), 5) for v in adj] for head, adj in prior.items()}
                                        if prior is not None else None)
        _export(result, raw_state, staging, version, crop_mm, temps, training, ood)
        test = _evaluate_test(staging, ds, splits, opts.crops)
        _add_test_metrics(staging, test, calib)
        _swap_in(staging, opts.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry = log_entry(opts, version, splits, result, temps, test, ds, previous)
    if opts.write_log:
        append_log(log_path(opts), entry)
    done = time.perf_counter()
    timings = {"prepare": prepared - started, "train": trained - prepared, "finish": done - trained}
    return FitOutcome(opts.out, version, splits, result, temps, test, entry, done - started, timings)


# -- inputs ------------------------------------------------------------------------------


def _check_out(opts: FitOptions) -> None:
    out = opts.out
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: exists and is not a model bundle; choose another --out")
    if (out / "manifest.json").exists() and not opts.force:
        raise DatasetError(f"{out}: a model bundle exists already; add --force to replace it")


@dataclass
class _Previous:
    """The bundle fine-tuned from (--from)."""

    path: Path
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]
    width_mult: float
    stone_stats: bool
    stats_path: bool
    mean: list[float]
    std: list[float]
    crop_mm: float


def _previous_bundle(path: Path | None) -> _Previous | None:
    if path is None:
        return None
    m = read_manifest(path)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise ModelError(f"{path}: no {WEIGHTS_FILE} (the trainer's weights); only bundles made by "
                         "`sorterd train` can be fine-tuned -- train from scratch instead")
    expected = m.raw.get("training", {}).get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise ModelError(f"{weights}: sha256 does not match the manifest's training.weights_sha256")
    if tuple(m.size) != (INPUT_SIZE, INPUT_SIZE):
        raise ModelError(f"{path}: input size {list(m.size)}; this trainer exports {INPUT_SIZE}x{INPUT_SIZE}")
    width = float(m.raw.get("training", {}).get("width_mult", 1.0))
    trained = m.raw.get("training", {}).get("config", {})
    stats, path_on = bool(trained.get("stone_stats", False)), bool(trained.get("stats_path", False))
    state = _load_weights(weights, width, stats, path_on)
    # The manifest's own numbers (float64), not Manifest.mean (float32): kept exactly.
    inp = m.raw["input"]
    return _Previous(path, m.raw, state, width, stats, path_on, [float(v) for v in inp["mean"]],
                     [float(v) for v in inp["std"]], m.crop_mm)


def _load_weights(path: Path, width_mult: float, stone_stats: bool, stats_path: bool = False
                  ) -> dict[str, torch.Tensor]:
    """weights.pt as a state dict that fits the manifest's architecture; errors name the file.

    weights_only=True: tensors and plain containers only, never arbitrary pickled objects.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # (torch's own advice in these messages -- weights_only=False -- would run the file's code)
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "empty or truncated"
        raise ModelError(f"{path}: not a weights file written by `sorterd train` "
                         f"({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    try:
        load_state(MobileNetV3Small(width_mult=width_mult, stone_stats=stone_stats, stats_path=stats_path), state)
    except ValueError as exc:
        raise ModelError(f"{path}: does not fit the manifest's model (width {width_mult}, stone_stats "
                         f"{stone_stats}, stats_path {stats_path}): {str(exc).splitlines()[0][:300]}") from None
    return state


def _check_test_unseen(previous: _Previous, ds: Dataset, splits: Splits) -> None:
    """Fine-tuning: the new test split must hold no stone the --from model trained or validated on (§7.4).

    Stone by stone where the previous snapshot of this dataset is still there; lot by lot
    where the new test set claims to be held-out lots (the previous model's training lots
    are its data lots but its test lots).
    """
    training = previous.manifest.get("training", {})
    data, old = training.get("data") or {}, training.get("splits") or {}
    seen: set[str] = set()
    if isinstance(data, dict) and isinstance(old, dict) and data.get("dir") == str(ds.root.resolve()) \
            and old.get("dir"):
        for name in ("train", "val"):
            path = Path(old["dir"]) / f"{name}.txt"
            if path.is_file():
                seen |= set(path.read_text().split())
    seen_lots: set[str] = set()
    if splits.lot_holdout and isinstance(data, dict):
        held = set(old.get("test_lots") or []) if isinstance(old, dict) and old.get("lot_holdout") else set()
        seen_lots = set(data.get("lots") or []) - held
    by_id = ds.by_id()
    leaked = [s for s in splits.test if s in seen or by_id[s].lot_id in seen_lots]
    if leaked:
        lots = sorted({by_id[s].lot_id for s in leaked})
        raise DatasetError(
            f"{previous.path}: was trained on {len(leaked)} of the {len(splits.test)} test stones "
            f"(lots {', '.join(lots)}); fine-tuned from it, the new model's test figures would be optimistic "
            "(§7.4). Hold out lots it never saw with --test-lots, or train from scratch")


def _crop_mm(ds: Dataset, opts: FitOptions, previous: _Previous | None) -> float:
    """The physical crop the dataset's images cover; the sorter must cut the same."""
    crop = opts.crop_mm or ds.crop_mm() or (previous.crop_mm if previous else None) or DEFAULT_CROP_MM
    if previous is not None and abs(previous.crop_mm - crop) > 1e-6:
        raise DatasetError(f"{opts.data}: crops of {crop} mm, but {previous.path} was trained on "
                           f"{previous.crop_mm} mm crops; fine-tuning needs the same crop")
    return crop


def asked_version(opts: FitOptions) -> str | None:
    """The version --version gives or the --out folder's name states (v2 -> v002), or None: then the next one.

    Folder, version and log agree: a folder named like a version gets that version, a
    --version that contradicts it is refused, and so is a version the model log already
    gives another bundle (one version, one model).
    """
    named = _VERSION.match(opts.out.name)
    if opts.version and named and not _same_version(opts.version, opts.out.name):
        raise DatasetError(f"--out {opts.out} names version {_canonical(int(named.group(1)))} but --version is "
                           f"{opts.version}: the bundle's folder and its version must agree; drop --version, or "
                           f"write to {opts.out.parent / opts.version}")
    version = opts.version or (_canonical(int(named.group(1))) if named else None)
    if version is not None and opts.write_log:
        _check_unlogged(opts, version)
    return version


def _canonical(number: int) -> str:
    return f"v{number:03d}"


def _same_version(a: str, b: str) -> bool:
    """v2 and v002 are one version; names that are not vN compare as written."""
    ma, mb = _VERSION.match(a), _VERSION.match(b)
    return int(ma.group(1)) == int(mb.group(1)) if ma and mb else a == b


def _check_unlogged(opts: FitOptions, version: str) -> None:
    """Refuse a version the model log already records for another bundle."""
    path = log_path(opts)
    for entry in _log_entries(path):
        if not _same_version(str(entry.get("version", "")), version):
            continue
        bundle = str(entry.get("bundle", ""))
        if bundle and (bundle == str(opts.out) or Path(bundle).resolve() == opts.out.resolve()):
            continue  # the same bundle made again (--force)
        latest = max(_version_number(str(e.get("version", ""))) for e in _log_entries(path))
        raise DatasetError(f"{path}: already records {version} (bundle {bundle or '?'}): a version names one "
                           f"model; write to {opts.out.parent / _canonical(latest + 1)} (the next free version), "
                           "or keep this model's log elsewhere with --log")


def _log_entries(path: Path) -> list[dict[str, Any]]:
    """The model log's entries (lines that are not JSON objects are skipped)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def next_version(opts: FitOptions, ds: Dataset, previous: _Previous | None) -> str:
    """v(N+1) after every version in the model log, the split snapshots and --from."""
    seen = [0]
    path = log_path(opts)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                seen.append(_version_number(str(json.loads(line).get("version", ""))))
            except (json.JSONDecodeError, AttributeError):
                continue
    if (ds.root / "splits").is_dir():
        seen += [_version_number(p.name) for p in (ds.root / "splits").iterdir()]
    if previous is not None:
        seen.append(_version_number(str(previous.manifest.get("version", ""))))
    return f"v{max(seen) + 1:03d}"


def _version_number(name: str) -> int:
    m = _VERSION.match(name)
    return int(m.group(1)) if m else 0


def _splits(ds: Dataset, opts: FitOptions, version: str, previous: _Previous | None, crop_mm: float,
            say: Say) -> Splits:
    if opts.splits:
        # Its own name stays: the manifest and the model log must point at the snapshot that exists.
        splits = read_splits(ds, opts.splits)
        say(f"splits: reusing {ds.root / 'splits' / opts.splits}")
        return splits
    kept, dups = dedupe(ds, ds.labels, INPUT_SIZE, crop_mm, ds.root / INPUT_CACHE)
    if dups:
        differ = sum(1 for d in dups if not d.labels_agree)
        say(f"duplicates: {len(dups)} stones have the same images as an earlier stone and are left out"
            + (f" ({differ} of them with a different label!)" if differ else ""))
    test_lots = opts.test_lots
    if test_lots is None and previous is not None:
        # Fine-tuning keeps the previous test lots out of training (§7.4).
        held = previous.manifest.get("training", {}).get("splits", {}).get("test_lots")
        test_lots = [lot for lot in held or [] if lot in {lab.lot_id for lab in kept}] or None
    splits = make_splits(kept, version=version, seed=opts.config.seed, test_lots=test_lots, duplicates=dups)
    folder = write_splits(ds, splits)
    how = (f"lots {', '.join(splits.test_lots)} held out" if splits.lot_holdout
           else "a stratified random sample (only one lot, or no lot small enough to hold out)")
    say(f"splits: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} ({how}) -> {folder}")
    return splits


def _arrays(ds: Dataset, splits: Splits, name: str, crop_mm: float, source: str,
            inputs: dict[str, SampleReport]) -> tuple[list[StoneLabel], TrainData]:
    """The split's classified stones and their inputs (`sorterd.data.samples.load_samples`);
    where they came from goes into inputs[name]."""
    by_id = ds.by_id()
    wanted = [by_id[s] for s in splits.ids(name) if by_id[s].classified]
    labels, images, inputs[name] = load_samples(ds, wanted, INPUT_SIZE, crop_mm, source, ds.root / INPUT_CACHE)
    need = 2 if name == "train" else 1
    if len(labels) < need:
        raise DatasetError(f"{ds.root}: the {name} split has {len(labels)} classified stones with an input "
                           f"({len(wanted) - len(labels)} skipped); need at least {need}")
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    color = np.array([lab.color_index for lab in labels], dtype=np.int64)
    clarity = np.array([lab.clarity_index for lab in labels], dtype=np.int64)
    return labels, TrainData(x, color, clarity)


def _warn_small_classes(labels: Sequence[StoneLabel], say: Say) -> None:
    counts = Counter(lab.class_name for lab in labels)
    few = [f"{c} {counts.get(c, 0)}" for c in CLASSES if counts.get(c, 0) < MIN_PER_CLASS]
    if few:
        say(f"warning: classes with fewer than {MIN_PER_CLASS} training stones (§1.3: collect more): " + ", ".join(few))


def _config(cfg: TrainConfig, previous: _Previous | None) -> TrainConfig:
    if previous is None:
        return cfg
    # §5.4: fine-tuning keeps the input normalisation and the architecture the weights were trained with.
    return replace(cfg, mean=tuple(previous.mean), std=tuple(previous.std), width_mult=previous.width_mult,
                   stone_stats=previous.stone_stats, stats_path=previous.stats_path,
                   backbone_dropout=cfg.backbone_dropout if previous.stone_stats else 0.0)


# -- after training ------------------------------------------------------------------------


def _calibrate(result: TrainResult, val: TrainData) -> tuple[dict[str, float], dict[str, Any]]:
    """One temperature per head on validation; ECE before and after."""
    color, clarity = predict_logits(result.model, val.x, result.mean, result.std)
    temps = {"color": fit_temperature(color, val.color), "clarity": fit_temperature(clarity, val.clarity)}
    color, clarity = color.astype(np.float64), clarity.astype(np.float64)  # figures in float64, like the fit
    before = {"color": expected_calibration_error(softmax(color), val.color),
              "clarity": expected_calibration_error(softmax(clarity), val.clarity)}
    after = {"color": expected_calibration_error(softmax(color, temps["color"]), val.color),
             "clarity": expected_calibration_error(softmax(clarity, temps["clarity"]), val.clarity)}
    return temps, {"val_ece_before": before, "val_ece_after": after}


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def apply_prior_correction(model: MobileNetV3Small, prior: dict[str, np.ndarray]) -> None:
    """Fold the correction into the heads' output biases (the exported graph is unchanged)."""
    with torch.no_grad():
        for layer, adj in ((model.head.color, prior["color"]), (model.head.clarity, prior["clarity"])):
            layer.bias.add_(torch.as_tensor(adj, dtype=layer.bias.dtype))


def _export(result: TrainResult, raw_state: dict[str, torch.Tensor], staging: Path, version: str, crop_mm: float,
            temps: dict[str, float], training: dict[str, Any], ood: OodFit | None = None) -> None:
    weights = staging / WEIGHTS_FILE
    # The trainer's weights before the prior correction: what fine-tuning continues from.
    torch.save(raw_state, weights)
    training["weights_file"] = WEIGHTS_FILE
    training["weights_sha256"] = sha256_file(weights)
    export_bundle(result.model, staging, version=version, mean=result.mean, std=result.std, crop_mm=crop_mm,
                  temperatures=temps, training=training, ood=ood)


def _evaluate_test(bundle: Path, ds: Dataset, splits: Splits, source: str) -> Evaluation | None:
    """The test split through onnxruntime, as `sorterd evaluate --crops source` sees it."""
    by_id = ds.by_id()
    labels = [by_id[s] for s in splits.test]
    if not labels:
        return None
    model = OnnxModel(bundle, threads=max(1, min(4, os.cpu_count() or 1)))
    return evaluate_model(model, ds, labels, DecisionConfig(), source)


def _add_test_metrics(bundle: Path, test: Evaluation | None, calib: dict[str, Any]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    metrics: dict[str, Any] = {"validation": _rounded(calib)}
    if test is not None:
        m = test.metrics
        metrics["test"] = {k: m[k] for k in ("n_stones", "n_classified", "overall", "color", "clarity",
                                             "cost_weighted", "cut_purity", "cut_recall", "flagged_rate",
                                             "select_divert_rate", "ece", "error_flag_recall", "ood_rate",
                                             "n_asked", "inputs")}
        metrics["test"]["per_class"] = {k: v["accuracy"] for k, v in m["per_class"].items()}
        metrics["test"]["verdict"] = m["verdict"]["summary"]
        metrics["test"]["milestone"] = m["milestones"]["reached"]
    manifest["metrics"] = metrics
    write_json_atomic(path, manifest)


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def _swap_in(staging: Path, out: Path) -> None:
    """Replace out by staging with two renames: readers see the old or the new bundle."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _training_record(opts: FitOptions, ds: Dataset, splits: Splits, result: TrainResult,
                     previous: _Previous | None, calib: dict[str, Any], train_labels: Sequence[StoneLabel]
                     ) -> dict[str, Any]:
    """The manifest's "training" section: enough to reproduce the run."""
    rec = result.summary()
    rec["command"] = opts.command or " ".join(sys.argv)
    rec["from"] = str(previous.path) if previous else None
    rec["data"] = {"dir": str(ds.root.resolve()), "stones": len(ds.labels), "lots": ds.lots(),
                   "train_classes": dict(Counter(lab.class_name for lab in train_labels))}
    rec["splits"] = {"version": splits.version, "dir": str((ds.root / "splits" / splits.version).resolve()),
                     "lot_holdout": splits.lot_holdout, "test_lots": splits.test_lots,
                     "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                     "duplicates_removed": len(splits.duplicates)}
    rec["calibration"] = _rounded(calib)
    return rec


# -- model log -------------------------------------------------------------------------------


def log_path(opts: FitOptions) -> Path:
    """Default: model_log.jsonl beside the bundle (models/default -> models/model_log.jsonl)."""
    return opts.log_path or opts.out.parent / "model_log.jsonl"


def log_entry(opts: FitOptions, version: str, splits: Splits, result: TrainResult, temps: dict[str, float],
              test: Evaluation | None, ds: Dataset, previous: _Previous | None) -> dict[str, Any]:
    """§5.5 fields first, then what makes the run reproducible."""
    m = test.metrics if test is not None else {}
    cfg = result.config
    return {
        "version": version,
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "training_samples": result.n_train,
        "new_samples_since_last": _new_since_last(opts, ds, splits, result.n_train),
        "epochs": result.epochs_run,
        "learning_rate": cfg.lr_backbone,
        "test_accuracy_color": m.get("color"),
        "test_accuracy_clarity": m.get("clarity"),
        "test_accuracy_combined": m.get("overall"),
        "cost_weighted_accuracy": m.get("cost_weighted"),
        "notes": opts.notes or (f"fine-tuned from {previous.manifest.get('version')}" if previous else ""),
        "bundle": str(opts.out),
        "data": str(ds.root.resolve()),
        "splits": splits.version,
        "test_lots": splits.test_lots,
        "test_stones": m.get("n_stones"),
        "flagged_rate": m.get("flagged_rate"),
        "cut_purity": m.get("cut_purity"),
        "cut_recall": m.get("cut_recall"),
        "error_flag_recall": m.get("error_flag_recall"),
        "ece": m.get("ece"),
        "temperatures": {k: round(v, 4) for k, v in temps.items()},
        "seed": cfg.seed,
        "width_mult": cfg.width_mult,
        "validation_samples": result.n_val,
        "best_epoch": result.best_epoch,
        "training_seconds": round(result.seconds, 1),
        "command": opts.command or " ".join(sys.argv),
    }


def _new_since_last(opts: FitOptions, ds: Dataset, splits: Splits, n_train: int) -> int:
    """Classified stones of this snapshot (train, val and test) the previous logged version never saw (§5.5).

    "Saw" is any part of that version's split snapshot of this dataset: a stone it was tested
    on is not new either.  When the last version learnt from other data (or none is logged),
    every stone here is new to the line.  This is the count `sorterd.trainer.retrain` triggers
    on (`new_label_ids`), so the log entry of a retrained model counts exactly the labels added
    since the model before it.
    """
    path = log_path(opts)
    last = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                last = entry
    by_id = ds.by_id()
    # Samples are classified stones: a skipped or non-gem label is never trained on (splits.py).
    ids = [s for s in (*splits.train, *splits.val, *splits.test) if s in by_id and by_id[s].classified]
    prev = ds.root / "splits" / str((last or {}).get("splits", ""))
    if last is None or last.get("data") != str(ds.root.resolve()) or not (prev / "train.txt").is_file():
        return len(ids)
    before = snapshot_ids(prev)
    return sum(1 for s in ids if s not in before)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
