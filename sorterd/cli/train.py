"""Trainer-side commands: `sorterd sim generate|lots`, `sorterd train`, `sorterd evaluate`, `sorterd compare`.

This module is imported by every `sorterd` invocation to build the parser,
so it imports nothing heavy: torch (the ``train`` extra) is imported inside
`sorterd train` only, matplotlib inside `--report` only, and a missing one
gets a one-line message saying which extra to install.

Exit status: 0 done; 2 bad arguments or data (the message names the file
and line); 3 a model bundle that cannot be used; 5 an optional dependency
is missing; 130 `sim generate` stopped by Ctrl-C (what was written is said).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from sorterd.cli.args import positive_int
from sorterd.configfile import ConfigError
from sorterd.data.bundle import ModelError
from sorterd.data.dataset import DatasetError
from sorterd.data.files import write_json_atomic

EXTRA_HINT = "install the train extra: pip install -e '.[train]' (or pip install 'sorterd[train]')"
EXIT_DATA, EXIT_MODEL, EXIT_MISSING = 2, 3, 5
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _add_sim(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_compare(sub)


# -- parsers ------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return v


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a date YYYY-MM-DD") from None


def _lots(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_sim(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = sub.add_parser("sim", help="simulated-machine tools (datasets from simulated lots)")
    simsub = sim.add_subparsers(dest="sim_command", required=True)
    g = simsub.add_parser(
        "generate", help="write a labelled dataset (§7.1 layout) from a simulated lot",
        description="Feed a simulated lot through the simulated machine and write what a capture session "
                    "would: raw frame pairs + session_meta.json + reference frames per session, ROI crops cut "
                    "by the daemon's segmentation, and labels.jsonl (§3.4). Appends to an existing DIR.")
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder (created or appended to)")
    g.add_argument("--stones", type=positive_int, required=True, metavar="N", help="labelled stones to write")
    g.add_argument("--lot", required=True, metavar="LOT", help="preset lot (see `sorterd sim lots`)")
    g.add_argument("--lot-id", metavar="ID", help="lot_id to record instead of the preset's (another parcel "
                   "of the same kind)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--session-stones", type=positive_int, default=1500, metavar="K",
                   help="stones per capture session; each session has its own lighting drift (default 1500)")
    g.add_argument("--date", type=_day, metavar="YYYY-MM-DD", help="date of the sessions (default today)")
    g.add_argument("--machines", choices=("nominal", "train", "shifted"), default="nominal",
                   help="each session's simulated machine: nominal (the default), train (drawn per session from "
                        "the shipped model's domain-randomisation ranges) or shifted (outside all of them at once); "
                        "see sorterd/sim/recipe.py")
    g.add_argument("--crop-mm", type=float, metavar="MM", help="side of the ROI crops in mm (default 6.4, "
                   "or what the dataset already uses)")
    g.set_defaults(func=cmd_sim_generate)
    lots = simsub.add_parser("lots", help="list the preset lots")
    lots.set_defaults(func=cmd_sim_lots)


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser(
        "train", help="train a model bundle on a §7.1 dataset (needs the train extra: torch)",
        description="De-duplicate (§3.5), split with whole lots held out for test (§7.3-7.4, snapshot in "
                    "DIR/splits/<version>/), train the dual-head MobileNetV3-Small (§9.4), calibrate, export "
                    "the bundle, evaluate it on the test split and append to the model log (§5.5). "
                    "Folder, version and log agree: name the --out folder after the version (models/v003 makes "
                    "v003; v3 is v003) or give --version for a folder with another name (default: the next "
                    "version after the model log); a --version that contradicts the folder's name, or a version "
                    "the model log already gives another bundle, is refused. The model log is model_log.jsonl "
                    "beside the bundle (--log elsewhere, --no-log none).")
    t.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset folder (§7.1)")
    t.add_argument("--out", type=Path, required=True, metavar="BUNDLE",
                   help="bundle folder to write; a name like v003 is the model's version")
    t.add_argument("--from", dest="from_bundle", type=Path, metavar="BUNDLE",
                   help="fine-tune this bundle (§5.4; keeps its mean/std, width and test lots)")
    t.add_argument("--version", metavar="vNNN", help="model version, for an --out folder not named like one (default: the folder's "
                   "name if it is vNNN, else the next after the model log)")
    t.add_argument("--splits", metavar="vNNN", help="reuse DIR/splits/<vNNN> instead of making new splits")
    t.add_argument("--test-lots", type=_lots, metavar="LOT[,LOT]", help="hold out these lots for test "
                   "(default: chosen automatically, whole lots)")
    t.add_argument("--epochs", type=_non_negative_int, metavar="N",
                   help="end-to-end epochs at most, early stopping on validation (default 14; 8 with --from)")
    t.add_argument("--epochs-heads", type=_non_negative_int, metavar="N",
                   help="heads-only epochs first (default 2; 1 with --from)")
    t.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="default 64")
    t.add_argument("--lr", type=float, metavar="LR", help="backbone learning rate (default 3e-4; 1e-4 with --from)")
    t.add_argument("--lr-heads", type=float, metavar="LR", help="heads learning rate (default 1e-3; 3e-4 with --from)")
    t.add_argument("--patience", type=positive_int, default=4, metavar="N",
                   help="stop after N epochs without a better validation loss (default 4)")
    t.add_argument("--width", type=float, default=1.0, metavar="W", help="MobileNetV3 width multiplier (default 1.0)")
    t.add_argument("--ema-epochs", type=float, metavar="E",
                   help="validate and keep a moving average of the weights over about E epochs (default 2; 0 = off)")
    t.add_argument("--seed", type=_non_negative_int, default=0, help="seed for splits, init, sampling (default 0)")
    t.add_argument("--threads", type=positive_int, metavar="N", help="torch threads (default: all cores)")
    t.add_argument("--crop-mm", type=float, metavar="MM", help="crop side the dataset's images cover, if it "
                   "does not record it (default 6.4)")
    _add_crops_arg(t, "The test split's figures are judged on the same inputs")
    t.add_argument("--no-stone-stats", action="store_true",
                   help="plain §9.4 head: without the stone-vs-background colour statistics beside the CNN features")
    t.add_argument("--no-stats-path", action="store_true",
                   help="no linear path of the stone statistics to the logits (default: one, as v005 has; "
                        "--no-stone-stats implies this)")
    t.add_argument("--backbone-dropout", type=float, metavar="P",
                   help="in training, drop the CNN features of this share of the samples (0..0.9), so the head "
                        "also sorts from the stone statistics alone (default 0.25; 0 with --no-stats-path)")
    t.add_argument("--no-prior-correction", action="store_true",
                   help="keep the balanced sampler's equal class priors in the exported model (default: shift "
                        "the heads to the training lots' real class mix)")
    t.add_argument("--log", type=Path, metavar="PATH", help="model log (default: model_log.jsonl beside BUNDLE)")
    t.add_argument("--no-log", action="store_true", help="do not append to the model log")
    t.add_argument("--notes", default="", help="notes for the model log entry")
    t.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--no-progress", action="store_true", help="epoch lines only, no progress bar")
    t.add_argument("--progress-json", type=Path, metavar="PATH",
                   help="also write the progress (epoch, batch, ETA) to PATH as JSON, atomically, about once a second")
    t.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = sub.add_parser(
        "evaluate", help="evaluate a model bundle on a dataset by the §8 metrics",
        description="Run the bundle through onnxruntime exactly as the sorter does and report overall, "
                    "colour, clarity and per-class accuracy, confusion matrices, cost-weighted accuracy "
                    "(§8.2), CUT purity/recall, flag rates (§5.2), ECE, per-lot figures and the §8.4 verdict.")
    e.add_argument("--model", default="default", metavar="BUNDLE", help="bundle folder, or 'default'")
    e.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset folder (§7.1)")
    _add_split_args(e)
    e.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="write the metrics as JSON")
    e.add_argument("--report", type=Path, metavar="DIR", help="write an HTML report with plots (needs matplotlib)")
    e.set_defaults(func=cmd_evaluate)


def _add_compare(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser(
        "compare", help="compare two bundles on the same stones (§5.4 step 5)",
        description="Evaluate OLD and NEW on the same stones, side by side, with a paired verdict on "
                    "cost-weighted accuracy.")
    c.add_argument("old", metavar="OLD", help="bundle folder, or 'default'")
    c.add_argument("new", metavar="NEW", help="bundle folder, or 'default'")
    c.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset folder (§7.1)")
    _add_split_args(c, whose="NEW's")
    c.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="write the comparison as JSON")
    c.set_defaults(func=cmd_compare)


def _add_crops_arg(p: argparse.ArgumentParser, then: str) -> None:
    # sorterd.data.samples' SOURCES and DEFAULT_SOURCE, written out: the parser imports nothing heavy
    p.add_argument("--crops", choices=("auto", "raw", "processed"), default="auto",
                   help="where each stone's model input comes from: auto (default) cut from its raw frame pair by "
                        "the sorter's own segmentation where its label links to one (raw_pair, raw_x_mm/raw_y_mm), "
                        "else its processed crop; raw: raw frames only (unlinked stones skipped); processed: "
                        "processed crops only (not on a dataset of raw frames only). The counts (and every skip's "
                        f"reason) are printed. {then}")


def _add_split_args(p: argparse.ArgumentParser, whose: str = "the model's") -> None:
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help=f"test: {whose} held-out test split of DIR (default); all: every stone in DIR")
    p.add_argument("--splits", metavar="vNNN", help="with --split test: this snapshot instead of the one "
                   "the model was trained with")
    p.add_argument("--config", type=Path, metavar="FILE", help="sorter config whose [decision] gates and bins "
                   "to use (default: the built-in §5.2/§8.2 defaults)")
    p.add_argument("--threads", type=positive_int, default=2, metavar="N", help="onnxruntime threads (default 2)")
    _add_crops_arg(p, "Stones that get no input are not judged: the output counts them and says so")


# -- sim -------------------------------------------------------------------------------------


def cmd_sim_lots(args: argparse.Namespace) -> int:
    from sorterd.sim.lots import LOTS

    for lot in LOTS.values():
        mix = lot.class_mix
        rare = 100 * mix["inky_transparent"] / sum(mix.values())
        print(f"{lot.name:<18} {lot.lot_id:<13} {lot.description}; {lot.origin}; sizes {lot.size_mm[0]}-"
              f"{lot.size_mm[1]} mm; inky+transparent {rare:.1f} %; hard cases {100 * lot.hard.total:.1f} %"
              f"{'; heat-treated' if lot.heat_treated else ''}")
    return 0


def cmd_sim_generate(args: argparse.Namespace) -> int:
    from sorterd import config
    from sorterd.sim.generate import GenerateInterrupted, GenerateOptions, generate
    from sorterd.sim.lots import get_lot

    def run() -> int:
        lot = get_lot(args.lot)
        if args.lot_id:
            lot = lot.with_lot_id(args.lot_id)
        if args.machines != "nominal":
            from dataclasses import replace

            from sorterd.sim.recipe import SHIFTED_MACHINE, TRAIN_MACHINES

            lot = replace(lot, machine=TRAIN_MACHINES if args.machines == "train" else SHIFTED_MACHINE)
        crop = args.crop_mm
        if crop is None:
            from sorterd.data.dataset import DEFAULT_CROP_MM, Dataset

            crop = Dataset(args.out, [], {}).crop_mm() or DEFAULT_CROP_MM
        opts = GenerateOptions(out=args.out, stones=args.stones, lot=lot, seed=args.seed,
                               session_stones=args.session_stones, day=args.date, crop_mm=crop)
        from sorterd.cli.compose import load_config

        try:
            res = generate(load_config(config.sim_config_path()), opts, progress=lambda s: print(s, flush=True))
        except GenerateInterrupted as stop:
            print(f"\nsorterd sim generate: interrupted: {_wrote(args.out, stop.result, lot.lot_id)}; "
                  "the last session is partial, its labels match its crops", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"{args.out}: {_wrote(args.out, res, lot.lot_id)} ({res.seconds:.0f} s)")
        return 0

    return _guarded("sim generate", run, getattr(args, "verbose", False))


def _wrote(out: Path, res: Any, lot_id: str) -> str:
    if not res.stones:
        return f"wrote no stones into {out}"
    return (f"wrote {res.stones} stones {res.first_id}..{res.last_id} of {lot_id} in "
            f"{len(res.sessions)} session(s) {', '.join(res.sessions)}")


# -- train --------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"sorterd train: needs PyTorch, which is not installed; {EXTRA_HINT}", file=sys.stderr)
        return EXIT_MISSING

    def run() -> int:
        from sorterd.train.evaluate import format_text
        from sorterd.train.job import FitOptions, default_config, fit
        from sorterd.train.progress import JsonProgress, ProgressBar

        old_head = args.no_stats_path or args.no_stone_stats  # the head before v005: no path, no dropout by default
        cfg = default_config(
            args.from_bundle is not None, epochs_heads=args.epochs_heads, epochs_full=args.epochs,
            batch_size=args.batch_size, lr_heads=args.lr_heads, lr_backbone=args.lr, patience=args.patience,
            seed=args.seed, width_mult=args.width, ema_epochs=args.ema_epochs, threads=args.threads,
            stone_stats=False if args.no_stone_stats else None,
            stats_path=False if old_head else None,
            backbone_dropout=args.backbone_dropout if args.backbone_dropout is not None else (0.0 if old_head else None),
            prior_correction=False if args.no_prior_correction else None,
        )
        opts = FitOptions(
            data=args.data, out=args.out, from_bundle=args.from_bundle, version=args.version, splits=args.splits,
            test_lots=args.test_lots, log_path=args.log, write_log=not args.no_log, force=args.force,
            crop_mm=args.crop_mm, crops=args.crops, notes=args.notes, command=_command_line(), config=cfg,
        )
        bar = ProgressBar(enabled=not args.no_progress)
        say = bar.line if not args.no_progress else _epoch_lines_only
        machine = JsonProgress(args.progress_json) if args.progress_json else None

        def on_step(event: Any) -> None:
            bar.step(event)
            if machine is not None:
                machine.step(event)

        try:
            outcome = fit(opts, say=say, on_step=on_step)
        finally:
            bar.close()
        r = outcome.result
        print(f"{outcome.bundle}: {outcome.version} written; {r.epochs_run} epochs (best {r.best_epoch}), "
              f"{r.seconds:.0f} s training, {outcome.seconds:.0f} s in all")
        if outcome.test is not None:
            print(f"test split ({len(outcome.splits.test)} stones, "
                  f"{'lots ' + ', '.join(outcome.splits.test_lots) if outcome.splits.lot_holdout else 'random'}):")
            print(format_text(outcome.test.metrics))
            _warn_short(outcome.test.metrics)
        return 0

    return _guarded("train", run, getattr(args, "verbose", False))


def _epoch_lines_only(text: str) -> None:
    if " batch " not in text or " done " in text:
        print(text, flush=True)


def _command_line() -> str:
    return "sorterd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- evaluate / compare ------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    def run() -> int:
        from sorterd.train.evaluate import format_text

        ev, info = _evaluate_bundle(args.model, args)
        ev.metrics["model"] = info["model"]
        ev.metrics["data"] = info["data"]
        print(f"{info['model']['bundle']} ({info['model']['version']}) on {info['data']['dir']} "
              f"[{info['data']['split_desc']}]")
        for warning in info["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(format_text(ev.metrics))
        _warn_short(ev.metrics)
        if args.json_path:
            _write_json(args.json_path, ev.metrics)
            print(f"metrics: {args.json_path}")
        if args.report:
            path = _report(ev, info, args.report)
            if path is None:
                return EXIT_MISSING
            print(f"report: {path}")
        return 0

    return _guarded("evaluate", run, getattr(args, "verbose", False))


def cmd_compare(args: argparse.Namespace) -> int:
    def run() -> int:
        from sorterd.train.evaluate import compare, format_comparison

        new, info_new = _evaluate_bundle(args.new, args)
        old, info_old = _evaluate_bundle(args.old, args, stones=info_new["stone_ids"])
        result = compare(old, new)
        result["old"] = info_old["model"]
        result["new"] = info_new["model"]
        result["data"] = info_new["data"]
        result["n_asked"], result["inputs"] = new.metrics["n_asked"], new.metrics["inputs"]
        print(f"OLD {info_old['model']['bundle']} ({info_old['model']['version']})  vs  "
              f"NEW {info_new['model']['bundle']} ({info_new['model']['version']})  on {info_new['data']['dir']} "
              f"[{info_new['data']['split_desc']}]")
        for warning in [*info_new["warnings"], *_trained_on(info_old, info_new["stone_ids"])]:
            print(f"warning: {warning}", file=sys.stderr)
        print(format_comparison(result))
        for name, ev in (("NEW", new), ("OLD", old)):
            _warn_short(ev.metrics, name)
        if args.json_path:
            _write_json(args.json_path, result)
        return 0

    return _guarded("compare", run, getattr(args, "verbose", False))


def _evaluate_bundle(name: str, args: argparse.Namespace, stones: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """Evaluate one bundle on the chosen stones of args.data; (Evaluation, info for the output)."""
    from sorterd.data.bundle import resolve_bundle
    from sorterd.data.dataset import open_dataset
    from sorterd.data.samples import INPUT_CACHE, check_source, dedupe
    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.evaluate import evaluate_model
    from sorterd.train.splits import read_splits

    bundle = resolve_bundle(name, None)
    model = OnnxModel(bundle, threads=args.threads)
    ds = open_dataset(args.data)
    check_source(ds, args.crops)
    training = model.manifest.raw.get("training", {})
    warnings: list[str] = []
    by_id = ds.by_id()
    if stones is not None:
        labels, desc = [by_id[s] for s in stones], "the same stones"
    elif args.split == "test":
        version = args.splits or training.get("splits", {}).get("version")
        if not version:
            raise DatasetError(f"{bundle}: the model records no split snapshot; use --split all (stones it never "
                               "saw) or --splits vNNN")
        trained_on = (training.get("data") or {}).get("dir")
        if not (ds.root / "splits" / version).is_dir() and not args.splits and trained_on != str(ds.root.resolve()):
            # Another dataset: none of its stones was seen in training.  (On the model's own
            # dataset a missing snapshot is not that: read_splits says which snapshots there are.)
            raise DatasetError(f"{ds.root}: has no split snapshot {version} (the model was trained on "
                               f"{trained_on or 'another dataset'}); evaluate with --split all (every stone here "
                               "is new to it) or --splits vNNN")
        labels, desc = [by_id[s] for s in read_splits(ds, version).test], f"test split {version}"
        if not labels:
            raise DatasetError(f"{ds.root / 'splits' / version / 'test.txt'}: empty test split")
    else:
        labels, dups = dedupe(ds, ds.labels, int(model.manifest.size[0]), model.manifest.crop_mm, ds.root / INPUT_CACHE)
        desc = f"all stones, {len(dups)} duplicates left out" if dups else "all stones"
        if training.get("data", {}).get("dir") == str(ds.root.resolve()):
            warnings.append(f"{bundle} was trained on this dataset: --split all includes its training stones, "
                            "so these figures are optimistic; use --split test")
    ev = evaluate_model(model, ds, labels, _decision(args), args.crops)
    trained = (training.get("inputs") or {}).get("source")
    if trained and trained != args.crops:
        warnings.append(f"{bundle} was trained on --crops {trained} inputs and is judged here on --crops "
                        f"{args.crops}: the figures are not those of the inputs it learnt from")
    unknown = ev.metrics["sizes_unknown"]
    if unknown:
        warnings.append(f"{unknown} stones have no size (no size_mm, no pixels_per_mm): the CUT rule took them as "
                        ">= the CUT minimum")
    m = model.manifest
    info = {
        "model": {"bundle": str(bundle), "version": m.version, "onnx_sha256": m.onnx_sha256,
                  "temperature": m.temperature},
        "data": {"dir": str(ds.root.resolve()), "split": "same" if stones is not None else args.split,
                 "split_desc": desc, "lots": sorted({lab.lot_id for lab in labels})},
        "warnings": warnings, "stone_ids": [lab.stone_id for lab in ev.labels], "training": training, "ds": ds,
    }
    return ev, info


def _warn_short(metrics: dict[str, Any], whose: str = "") -> None:
    """An evaluation that judged fewer stones than asked says so on stderr, loudly."""
    from sorterd.train.evaluate import short_warning

    short = short_warning(metrics)
    if short:
        print(f"WARNING: {whose + ': ' if whose else ''}{short}", file=sys.stderr)


def _trained_on(info_old: dict[str, Any], stones: list[str]) -> list[str]:
    """OLD may have trained on some of NEW's test stones (same dataset, other split): say so."""
    splits = info_old["training"].get("splits", {})
    if info_old["training"].get("data", {}).get("dir") != info_old["data"]["dir"] or not splits.get("dir"):
        return []
    train = Path(splits["dir"]) / "train.txt"
    if not train.is_file():
        return []
    overlap = len(set(stones) & set(train.read_text().split()))
    return [f"OLD was trained on {overlap} of these stones: the comparison favours OLD"] if overlap else []


def _decision(args: argparse.Namespace) -> Any:
    from sorterd import config

    if args.config is None:
        return config.DecisionConfig()
    from sorterd.cli.compose import load_config

    return load_config(args.config).decision


def _report(ev: Any, info: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"sorterd evaluate: --report needs matplotlib, which is not installed; {EXTRA_HINT}", file=sys.stderr)
        return None
    from sorterd.train.report import write_report

    return write_report(ev, info["ds"], out, title=f"{info['model']['version']} on {Path(info['data']['dir']).name}",
                        subtitle=f"{info['model']['bundle']} · {info['data']['split_desc']} · lots "
                                 f"{', '.join(info['data']['lots'])}")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj)


def _guarded(name: str, run: Callable[[], int], verbose: bool = False) -> int:
    """Known failures become one clear line and an exit status, not a traceback (-v: traceback)."""
    if verbose:
        return run()
    try:
        return run()
    except DatasetError as exc:
        print(f"sorterd {name}: error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except ModelError as exc:
        print(f"sorterd {name}: model error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_DATA
    except ValueError as exc:  # bad option values (bounds checked by the option classes)
        print(f"sorterd {name}: error: {exc}", file=sys.stderr)
        return EXIT_DATA
