"""`sorterd calibrate [--config FILE | --sim] [--yes] [--set-baseline]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sorterd.cli.args import fault
from sorterd.cli.paths import Output, OutputPathError, check_outputs
from sorterd.configfile import ConfigError

DESCRIPTION = """\
The §2.4 session checklist. The simulated machine (--sim, camera.type = 'sim') calibrates itself.
A real machine is calibrated with a person at the terminal: it prompts for the gray card, the
calibration target (calibration.target_diameter_mm), the reference stone kit (calibration.kit) and
the valve test stones, and asks where each test stone landed. With --yes those steps cannot be done
and are recorded as 'skip' (they need an operator): a skipped required step is not a pass, so the
profile does not pass. Exit status: 0 passed, 1 not passed (or the machine failed during the
session), 2 bad config or kit file, or an output (calibration.dir, --json) that cannot be written, 3 model
error."""


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("calibrate", help="the session checklist (§2.4): run it before every sorting session",
                       description=DESCRIPTION)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="TOML config file of this sorter")
    src.add_argument("--sim", action="store_true", help="calibrate the simulated machine")
    c.add_argument("--yes", action="store_true",
                   help="non-interactive: no prompts (automation); on a real machine the steps that need an "
                        "operator (gray card, target, reference kit, valve test stones) are skipped and the "
                        "profile does not pass")
    c.add_argument("--warmup-s", type=float, help="light warm-up seconds (default calibration.warmup_s; 0 skips)")
    c.add_argument("--set-baseline", action="store_true",
                   help="explicit operator action: store this session's measurements as the machine's baseline "
                        "(<calibration.dir>/<machine>/baseline.json), the reference for backlight and white-balance "
                        "drift in later sessions -- only on a healthy machine, and only if the session passes; "
                        "until a baseline exists those two steps warn")
    c.add_argument("--sim-fault", action="append", default=[], type=fault, metavar="NAME=VALUE",
                   help="simulation: inject a drift or fault, e.g. backlight=-0.08 wb_delta_e=5 scale=0.1 "
                        "reference_mislabel=0.3 cut_valve_slow_ms=3")
    c.add_argument("--json", type=Path, dest="json_path", help="write the profile as JSON here too")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sorterd import config
    from sorterd.calibration import checklist as calibrate
    from sorterd.cli.compose import load_config
    from sorterd.data.bundle import ModelError, resolve_bundle
    from sorterd.parts.inference.onnxruntime import OnnxModel

    over = {"sim": {"faults": dict(args.sim_fault)}} if args.sim_fault else {}
    try:
        cfg = load_config(args.config or config.sim_config_path(), over)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    if cfg.camera.type == "replay":
        print("sorterd calibrate: camera.type = 'replay': a replayed session is not calibrated, it brings its own "
              "references and scale", file=sys.stderr)
        return 2
    try:  # before the model loads or a light warms up: a profile that cannot be saved is a wasted session
        check_outputs([Output("calibration.dir", Path(cfg.calibration.dir), "dir")]
                      + ([Output("--json", args.json_path, "file")] if args.json_path else []))
    except OutputPathError as exc:
        print(exc.report("calibrate"), file=sys.stderr)
        return 2
    try:
        model = OnnxModel(resolve_bundle(cfg.inference.model, cfg.source.parent if cfg.source else None))
    except ModelError as exc:
        print(f"sorterd: model error: {exc}", file=sys.stderr)
        return 3
    warmup = cfg.calibration.warmup_s if args.warmup_s is None else args.warmup_s
    if cfg.camera.type == "sim":
        from sorterd.sim.rig import SimRig

        # Prompts need a person at a terminal; --yes (or no terminal, on the simulated machine) runs straight through.
        interactive = not args.yes and (sys.stdin.isatty() or not args.sim)
        profile, refs, base = calibrate.run_checklist(cfg, SimRig(cfg), model, sys.stdout, interactive, warmup)
    else:
        result = _calibrate_machine(cfg, model, interactive=not args.yes, warmup_s=warmup)
        if isinstance(result, int):
            return result
        profile, refs, base = result
    meta = calibrate.session_meta(profile, profile.steps, base, cfg)
    where = calibrate.save_profile(Path(cfg.calibration.dir), profile, refs, meta)
    print(f"profile written to {where}")
    if args.json_path:
        profile.save(args.json_path)
    if args.set_baseline:
        if not profile.passed:
            print("sorterd calibrate: --set-baseline: not stored, the calibration did not pass (a baseline must come "
                  "from a healthy machine)", file=sys.stderr)
        else:
            new = calibrate.baseline_from(profile)
            path = calibrate.save_baseline(Path(cfg.calibration.dir), cfg.machine.name, new)
            old = f" (replaced: {base})" if base is not None else ""
            print(f"baseline written to {path}: backlight {new.backlight_intensity:.1f} DN, gray BGR "
                  f"{[round(v, 1) for v in new.gray_bgr]}, {new.pixels_per_mm:.2f} px/mm{old}")
    return 0 if profile.passed else 1


def _calibrate_machine(cfg: Any, model: Any, interactive: bool, warmup_s: float) -> Any:
    """A real machine: its parts through MachineRig.  (profile, refs, baseline), or an exit status."""
    from sorterd.calibration import checklist as calibrate
    from sorterd.calibration.rig import KitError, MachineRig, RigError, configured_kit, kit_labels, terminal_answer
    from sorterd.cli import compose
    from sorterd.parts.camera import CameraError

    if interactive:
        if not sys.stdin.isatty():
            print("sorterd calibrate: a real machine's calibration needs a person at a terminal (gray card, target, "
                  "reference kit, valve test stones); --yes runs only the unattended steps, and the profile "
                  "then does not pass", file=sys.stderr)
            return 2
        try:  # before anything warms up: the kit file must be right
            kit_labels(configured_kit(cfg))
        except KitError as exc:
            print(f"sorterd calibrate: {exc}", file=sys.stderr)
            return 2
    try:
        rig = MachineRig(cfg, parts=compose.open_parts, answer=terminal_answer if interactive else None)
    except Exception as exc:  # noqa: BLE001 -- any backend's failure to open: say which and stop
        print(f"sorterd calibrate: cannot open the machine ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    try:
        with rig:
            return calibrate.run_checklist(cfg, rig, model, sys.stdout, interactive, warmup_s)
    except (RigError, CameraError, ValueError) as exc:  # ValueError: a bad kit or baseline file
        print(f"\nsorterd calibrate: stopped, no profile written: {exc}", file=sys.stderr)
        return 1
