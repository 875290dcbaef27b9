"""The `sorterd` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorterd import __version__
from sorterd.cli import calibrate, keys, models, retrain, review, train, trainer
from sorterd.cli.args import fault, positive_float, positive_int
from sorterd.cli.paths import Output, OutputPathError, check_outputs
from sorterd.configfile import ConfigError

EPILOG = """\
§ numbers in help and messages refer to the domain reference, docs/domain.md (classes, bins and
costs, thresholds, the calibration checklist, the dataset layout); every config option is in
docs/config.md (sorterd check-config --reference). Exit codes of `sorterd run`: README.md."""
if TYPE_CHECKING:
    from sorterd.config import Config
    from sorterd.data.bundle import Manifest


def _backend_types(part: str) -> tuple[str, ...]:
    from sorterd.cli.compose import registry

    return tuple(k for k in registry()[part] if k != "replay")  # replay: --replay sets camera and trigger together


def _valve_types() -> tuple[str, ...]:
    return _backend_types("valves")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sorterd", description="Optical sorter for rough sapphire melee.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the sorter (real hardware, or the simulated machine)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="TOML config file")
    src.add_argument("--sim", action="store_true", help="the simulated machine (the shipped example config)")
    r.add_argument("--replay", type=Path, metavar="SESSION_DIR",
                   help="feed a recorded session folder (§7.1 images/raw/<session>) through the pipeline, "
                        "valves dry; with --config, that config's model and decision settings")
    r.add_argument("--record", type=Path, metavar="DATA_DIR",
                   help="record every frame pair as a §7.1 session under DATA_DIR/images/raw/")
    r.add_argument("--decisions", type=Path, metavar="PATH", help="write one JSON line per stone here")
    r.add_argument("--link-drain", type=float, default=0.0, metavar="S",
                   help="with [link] enabled: after the batch, wait up to S seconds for the trainer to "
                        "acknowledge what the outbox holds (default 0: leave it for the next run)")
    r.add_argument("--valves", choices=_valve_types(), metavar="TYPE",
                   help="valve backend for this run, overriding [valves] type: " + ", ".join(_valve_types())
                        + " (mcu with the simulated machine runs the controller firmware's host build on a pty)")
    r.add_argument("--trigger", choices=_backend_types("trigger"), metavar="TYPE",
                   help="trigger backend for this run, overriding [trigger] type: "
                        + ", ".join(_backend_types("trigger")) + " (vision works with the simulated camera)")
    r.add_argument("--lights", choices=_backend_types("lights"), metavar="TYPE",
                   help="strobe backend for this run, overriding [lights] type: " + ", ".join(_backend_types("lights"))
                        + " (mcu needs --valves mcu: the strobes are outputs of the valve controller)")
    r.add_argument("--stones", type=positive_int, default=500, help="simulation: stones to feed (default 500)")
    r.add_argument("--rate", type=positive_float, help="simulation: stones per second (sim.rate_per_s)")
    r.add_argument("--sim-speed", type=positive_float, metavar="MM_S",
                   help="simulation: mean stone speed on the channel (sim.speed_mm_s)")
    r.add_argument("--sim-gap", type=float, metavar="MM",
                   help="simulation: singulation's smallest edge-to-edge gap (sim.min_gap_mm)")
    r.add_argument("--seed", type=int, help="simulation: world seed (sim.seed)")
    r.add_argument("--clock", choices=("virtual", "wall"), help="simulation: clock (sim.clock)")
    r.add_argument("--log-dir", type=Path, help="where the batch folder goes (record.log_dir)")
    r.add_argument("--batch", help="batch name (record.batch)")
    r.add_argument("--json", type=Path, dest="json_path", help="write the run summary as JSON here")
    r.add_argument("--sim-fault", action="append", default=[], type=fault, metavar="NAME=VALUE",
                   help="simulation: inject a fault or drift (repeatable), e.g. camera_drop_at_s=2 "
                        "camera_down_s=0.5 backlight=-0.08 scale=0.1")
    r.add_argument("--metrics-port", type=int, help="Prometheus port (metrics.port; 0 = any free port)")
    r.add_argument("--metrics-linger", type=float, metavar="S",
                   help="keep serving the final metrics S seconds after the batch ends (metrics.linger_s)")
    r.add_argument("--no-progress", action="store_true", help="no live progress line")
    r.add_argument("--uncalibrated", action="store_true",
                   help="sort without a passing calibration of today (operator override, logged in the batch)")

    c = sub.add_parser("check-config", help="validate a config file; non-zero exit on any error")
    c.add_argument("file", type=Path, nargs="?", help="TOML config file")
    c.add_argument("--reference", action="store_true", help="print the config reference instead")
    r.set_defaults(func=cmd_run)
    c.set_defaults(func=cmd_check_config)
    for commands in (calibrate, train, keys, trainer, models, retrain, review):
        # Each adds its subcommands with set_defaults(func=...); heavy imports
        # (torch, the pipeline) happen inside the command functions, not here.
        commands.add_commands(sub)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    o: dict[str, dict[str, Any]] = {}
    if args.replay is not None:
        o["camera"] = {"type": "replay", "session": str(args.replay.resolve())}
        o["trigger"] = {"type": "replay"}
        o["valves"] = {"type": "dry"}
    for part in ("valves", "trigger", "lights"):
        if getattr(args, part) is not None:
            o[part] = {"type": getattr(args, part)}
    for (section, key), (_, value) in _flag_values(args).items():
        if value is not None:
            o.setdefault(section, {})[key] = value
    if args.sim_fault:
        o.setdefault("sim", {})["faults"] = dict(args.sim_fault)  # checked by the config schema
    return o


EXIT_CANNOT_RECORD = 6  # the batch database cannot be opened: nothing sorted
EXIT_RECORDS_LOST = 7  # sorted, but stone records were lost (disk full or failing)
EXIT_BAD_SESSION = 3  # a model bundle or a --replay session that cannot be used (also: one that decides nothing)


def _flag_values(args: argparse.Namespace) -> dict[tuple[str, str], tuple[str, Any]]:
    """(section, key) -> (the CLI flag that sets that option, the value it gave; None: not given)."""
    log_dir = str(args.log_dir.resolve()) if args.log_dir else None
    return {("sim", "rate_per_s"): ("--rate", args.rate), ("sim", "seed"): ("--seed", args.seed),
            ("sim", "speed_mm_s"): ("--sim-speed", args.sim_speed), ("sim", "min_gap_mm"): ("--sim-gap", args.sim_gap),
            ("sim", "clock"): ("--clock", args.clock), ("record", "log_dir"): ("--log-dir", log_dir),
            ("record", "batch"): ("--batch", args.batch), ("metrics", "port"): ("--metrics-port", args.metrics_port),
            ("metrics", "linger_s"): ("--metrics-linger", args.metrics_linger)}


def _blame_flags(exc: ConfigError, args: argparse.Namespace) -> ConfigError:
    """A problem with a value that came from a flag names the flag, not the config file."""
    given = {f"{s}.{k}": flag for (s, k), (flag, v) in _flag_values(args).items() if v is not None}
    problems = [f"{given[p.split(' ', 1)[0]]}: {p}" if p.split(" ", 1)[0] in given else p for p in exc.problems]
    blamed = sum(p != q for p, q in zip(problems, exc.problems, strict=True))
    if not blamed:
        return exc
    source = "the command line" if blamed == len(problems) else f"{exc.source} and the command line"
    return ConfigError(problems, source)


def _run_outputs(args: argparse.Namespace, cfg: Config) -> list[Output]:
    """Every path `sorterd run` will write, labelled as the user named it."""
    outs = [Output("--log-dir" if args.log_dir else "record.log_dir", Path(cfg.record.log_dir), "dir")]
    given = (("--json", args.json_path, "file"), ("--record", args.record, "dir"),
             ("--decisions", args.decisions, "file"))
    if cfg.link.enabled:
        outs.append(Output("link.outbox_dir", Path(cfg.link.outbox_dir), "dir"))
    return outs + [Output(label, path, kind) for label, path, kind in given if path is not None]


def cmd_run(args: argparse.Namespace) -> int:
    from sorterd import config
    from sorterd.calibration.checklist import CalibrationRefused
    from sorterd.cli.compose import load_config
    from sorterd.cli.run import RunOptions, run
    from sorterd.data.bundle import ModelError
    from sorterd.data.session import SessionError
    from sorterd.link.keys import KeyFileError
    from sorterd.link.outbox import OutboxError
    from sorterd.parts.camera import CameraError
    from sorterd.sorting.record import RecordError

    if not (args.sim or args.config or args.replay):
        print("sorterd run: give --config FILE, --sim or --replay SESSION_DIR", file=sys.stderr)
        return 2
    path = args.config or config.sim_config_path()
    try:
        cfg = load_config(path, _overrides(args))
    except ConfigError as exc:
        print(_blame_flags(exc, args).report(), file=sys.stderr)
        return 2
    if not cfg.simulated and any(v is not None for v in (args.rate, args.seed, args.sim_speed, args.sim_gap)):
        print("sorterd: --rate, --seed, --sim-speed, --sim-gap and --clock only apply to the simulated machine", file=sys.stderr)
        return 2
    if cfg.simulated and not cfg.offline and cfg.sim.clock == "virtual":
        parts = cfg.real_time_parts
        print(f"sorterd: note: {', '.join(parts)} {'is' if len(parts) == 1 else 'are'} real time: the simulated "
              "machine runs on the wall clock (sim.clock = 'virtual' is ignored)", file=sys.stderr)
    try:  # before the model loads or the machine calibrates: a bad path must not cost a batch
        check_outputs(_run_outputs(args, cfg))
    except OutputPathError as exc:
        print(exc.report("run"), file=sys.stderr)
        return 2
    try:
        result = run(cfg, RunOptions(stones=args.stones, json_path=args.json_path, progress=not args.no_progress,
                                     record_dir=args.record, decisions_path=args.decisions,
                                     uncalibrated=args.uncalibrated, link_drain_s=max(0.0, args.link_drain)))
    except ModelError as exc:
        print(f"sorterd: model error: {exc}", file=sys.stderr)
        return 3
    except SessionError as exc:
        print(f"sorterd: cannot replay: {exc}", file=sys.stderr)
        return 3
    except CalibrationRefused as exc:
        print(f"sorterd: refusing to sort: {exc}", file=sys.stderr)
        return 5
    except ConfigError as exc:  # found only once the hardware is open (e.g. the trigger zone vs the view)
        print(exc.report(), file=sys.stderr)
        return 2
    except RecordError as exc:
        print(f"sorterd: cannot record: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RECORD
    except OutboxError as exc:
        print(f"sorterd: cannot open the link's outbox: {exc}", file=sys.stderr)
        return 2
    except KeyFileError as exc:
        print(f"sorterd: [link] key: {exc}", file=sys.stderr)
        return 2
    except (OSError, CameraError) as exc:
        print(f"sorterd: cannot run the machine: {exc}", file=sys.stderr)
        return 4
    lost = _records_lost_exit(result.summary["record"])
    if lost:
        return lost  # lost records outrank how the run ended
    if _nothing_decided(result.summary, replay=cfg.camera.type == "replay") and result.stop_signal is None:
        return EXIT_BAD_SESSION
    if result.stop_signal is not None:
        return 128 + result.stop_signal  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return 0


def _nothing_decided(summary: dict[str, Any], replay: bool) -> bool:
    """Never a silent zero: a run that decided fewer objects than it had pairs says so on
    stderr with the reasons; True when it is a replay that decided nothing at all (exit 3:
    the session is no use as it is, like one that cannot be read)."""
    from sorterd.sorting.summary import shortfall

    short = shortfall(summary)
    if not short:
        return False
    if replay and summary["objects_decided"] == 0:
        print(f"sorterd: the replay decided nothing: {short}", file=sys.stderr)
        return True
    print(f"sorterd: warning: {short}", file=sys.stderr)
    return False


def _records_lost_exit(record: dict[str, Any]) -> int:
    """A run whose production log lost stone records does not exit 0 (images alone do not count)."""
    lost = {k: record["lost"][k] for k in ("rows", "unseen", "decisions") if record["lost"][k]}
    if not lost:
        return 0
    print("sorterd: stone records lost (disk full or failing): " + ", ".join(f"{k} {n}" for k, n in lost.items())
          + "; see the summary's record section", file=sys.stderr)
    return EXIT_RECORDS_LOST


def cmd_check_config(args: argparse.Namespace) -> int:
    from sorterd.cli.compose import config_reference, load_config
    from sorterd.data.bundle import ModelError

    if args.reference:
        print(config_reference())
        return 0
    if args.file is None:
        print("sorterd check-config: give a FILE (or --reference)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    try:
        model = check_model(cfg)
    except ModelError as exc:
        print(f"sorterd check-config: {args.file}: inference.model = {cfg.inference.model!r}: model error: {exc}",
              file=sys.stderr)
        return 3
    kinds = ", ".join(f"{p}={getattr(cfg, p).type}" for p in ("camera", "lights", "trigger", "valves", "inference"))
    kinds += f"; model {model.version} at {model_dir(cfg)}"
    print(f"{args.file}: OK ({kinds})")
    return 0


def model_dir(cfg: Config) -> Path:
    """The bundle directory inference.model names (relative to the config file)."""
    from sorterd.data.bundle import resolve_bundle

    return resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None)


def check_model(cfg: Config) -> Manifest:
    """The bundle resolves, its manifest reads and model.onnx is there; the Manifest.  Not the full load
    (no sha256, no onnxruntime): `sorterd run` does that."""
    from sorterd.data.bundle import ModelError, read_manifest

    bundle = model_dir(cfg)
    if not bundle.is_dir():
        raise ModelError(f"{bundle}: no such directory (a bundle holds manifest.json and model.onnx)")
    manifest = read_manifest(bundle)
    if not (bundle / "model.onnx").is_file():
        raise ModelError(f"{bundle}: no model.onnx")
    return manifest
# `sorterd run` exit codes that are refusals, not crashes: starting again changes nothing until
# a person acts, so the service is not restarted (systemd/sorterd.service RestartPreventExitStatus=).
# 4 (cannot run the machine: a device missing or busy) may pass by itself and is restarted.
REFUSALS = {2: "the config is invalid", 3: "the model or the replayed session is unusable",
            5: "no passing calibration of today", 6: "the batch database cannot be opened"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sorterd import journal  # under systemd: the journal, with structured fields

    journal.configure(logging.DEBUG if args.verbose else logging.WARNING,
                      "%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = int(args.func(args))
    if args.command == "run" and code in REFUSALS:
        _tell_systemd_why(code)
    return code


def _tell_systemd_why(code: int) -> None:
    """Under systemd: the refusal in `systemctl status` (STATUS=) and as the journal's last line."""
    from sorterd import sdnotify

    why = f"not sorting: {REFUSALS[code]} (exit {code}, a refusal: not restarted until fixed; the log above says why)"
    if sdnotify.notify(f"STATUS={why}"):
        print(f"sorterd: {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
