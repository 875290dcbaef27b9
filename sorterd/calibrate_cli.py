"""`sorterd calibrate [--config FILE | --sim] [--yes]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sorterd.configfile import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from sorterd.cli import _fault

    c = sub.add_parser("calibrate", help="the session checklist (§2.4): run it before every sorting session")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="TOML config file of this sorter")
    src.add_argument("--sim", action="store_true", help="calibrate the simulated machine")
    c.add_argument("--yes", action="store_true", help="non-interactive: no prompts (automation)")
    c.add_argument("--warmup-s", type=float, help="light warm-up seconds (default calibration.warmup_s; 0 skips)")
    c.add_argument("--sim-fault", action="append", default=[], type=_fault, metavar="NAME=VALUE",
                   help="simulation: inject a drift or fault, e.g. backlight=-0.08 wb_delta_e=5 scale=0.1 "
                        "reference_mislabel=0.3 cut_valve_slow_ms=3")
    c.add_argument("--json", type=Path, dest="json_path", help="write the profile as JSON here too")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sorterd import calibrate, config
    from sorterd.infer import ModelError, OnnxModel, resolve_bundle

    over = {"sim": {"faults": dict(args.sim_fault)}} if args.sim_fault else {}
    try:
        cfg = config.load(args.config or config.sim_config_path(), over)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    if cfg.camera.type != "sim":
        print(f"sorterd calibrate: camera.type = {cfg.camera.type!r}: calibrating a real machine needs its "
              "strobe and trigger backends, which are not built yet; `--sim` calibrates the simulated machine",
              file=sys.stderr)
        return 2
    try:
        model = OnnxModel(resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None))
    except ModelError as exc:
        print(f"sorterd: model error: {exc}", file=sys.stderr)
        return 3
    from sorterd.sim.rig import SimRig

    warmup = cfg.calibration.warmup_s if args.warmup_s is None else args.warmup_s
    # Prompts need a person at a terminal; --yes (or no terminal, on the simulated machine) runs straight through.
    interactive = not args.yes and (sys.stdin.isatty() or not args.sim)
    profile, refs, base = calibrate.run_session(cfg, SimRig(cfg), model, sys.stdout, interactive, warmup)
    meta = calibrate.session_meta(profile, profile.steps, base, cfg)
    where = calibrate.save_profile(Path(cfg.calibration.dir), profile, refs, meta)
    print(f"profile written to {where}")
    if args.json_path:
        profile.save(args.json_path)
    return 0 if profile.passed else 1
