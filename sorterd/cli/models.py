"""`sorterd models ...`: model bundle tools.  `build-engine` builds (or checks) a bundle's TensorRT
engine ahead of time; signed releases (`sorterd.release`): `sign` and `offer` (trainer: put a signed
release where the trainer offers it to its sorters, DIR/releases/signed/<N>/), `verify` (the sorter's
own checks, `verify_release`), and on the sorter `stage`, `list`, `activate`, `rollback`, `pin`.

Exit status: 0 done; 1 refused (the failing check is named: `verify`/`stage`); 2 bad input."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

from sorterd.config import ModelsConfig as ModelsDefaults
from sorterd.data.bundle import ModelError


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    m = sub.add_parser("models", help="model bundle tools (TensorRT engine build)")
    msub = m.add_subparsers(dest="models_command", required=True)
    b = msub.add_parser("build-engine", help="build and cache a bundle's TensorRT engine now, checked on its golden inputs")
    b.add_argument("bundle", type=Path, help="model bundle directory (model.onnx + manifest.json)")
    b.add_argument("--config", type=Path, help="take [inference] precision/max_batch/opt_batch/engine_cache from this config")
    b.add_argument("--precision", choices=("auto", "fp16", "fp32"), help="override inference.precision")
    b.add_argument("--max-batch", type=int, help="override inference.max_batch")
    b.add_argument("--engine-cache", help="override inference.engine_cache (default: <bundle>.engines beside it)")
    b.set_defaults(func=cmd_build_engine)
    add_release_commands(msub)


def add_release_commands(msub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = msub.add_parser("sign", help="make signed release N of a bundle (trainer): lists every file, signs the manifest")
    s.add_argument("bundle", type=Path, help="model bundle directory (model.onnx + manifest.json)")
    s.add_argument("--key", required=True, type=Path, help="the release private key (NAME.release.key, mode 0600)")
    s.add_argument("--release", required=True, type=int, help="release number: higher than every earlier one")
    s.add_argument("--trainer", default=socket.gethostname(), help="the trainer's identity written in the manifest")
    s.add_argument("--out", type=Path, help="release directory to write (default: BUNDLE-rN beside the bundle)")
    s.set_defaults(func=cmd_sign)
    v = msub.add_parser("verify", help="run the sorter's release checks on BUNDLE; non-zero names the first that failed")
    v.add_argument("bundle", type=Path)
    v.add_argument("--trusted", type=Path, action="append", default=[],
                   help="a trusted release public key (repeatable; default: [models] trusted_keys of --config)")
    v.add_argument("--config", type=Path, help="the sorter's config: trusted keys, size limit and downgrade floor")
    v.set_defaults(func=cmd_verify)
    o = msub.add_parser("offer", help="offer a signed release to the trainer's sorters: verified, then copied to "
                                      "DATA/releases/signed/<N>/ (the running trainer offers the newest there)")
    o.add_argument("bundle", type=Path, help="a signed release (sorterd models sign)")
    o.add_argument("--data", required=True, type=Path, help="the trainer's data directory (sorterd trainer --data)")
    o.add_argument("--trusted", required=True, type=Path, action="append",
                   help="a release public key the sorters trust (repeatable): the signature is checked against it")
    o.set_defaults(func=cmd_offer)
    for name, what in (("stage", "verify BUNDLE into the sorter's release store and run the QA gate (golden + "
                                 "the reference kit calibration recorded)"),
                       ("list", "the stored releases, the active and previous one, the downgrade floor"),
                       ("activate", "make a stored release the active one (next start-up loads it)"),
                       ("rollback", "back to the previous release"),
                       ("pin", "allow exactly one older release through the downgrade check")):
        c = msub.add_parser(name, help=what)
        c.add_argument("--config", required=True, type=Path, help="the sorter's config ([models])")
        if name == "stage":
            c.add_argument("bundle", type=Path)
        if name in ("activate", "pin"):
            c.add_argument("release", type=int)
        c.set_defaults(func=cmd_store)


def cmd_sign(args: argparse.Namespace) -> int:
    from sorterd.link.keys import KeyFileError
    from sorterd.release.keys import load_private
    from sorterd.release.sign import sign_release

    out = args.out or args.bundle.with_name(f"{args.bundle.name}-r{args.release}")
    try:
        sign_release(args.bundle, out, load_private(args.key), args.release, args.trainer)
    except (KeyFileError, ModelError) as exc:
        print(f"sorterd models sign: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: release {args.release}, signed")
    return 0


def _trusted(paths: list[Path]) -> list[Any]:
    from sorterd.release.keys import load_public

    return [load_public(p) for p in paths]


def _open_store(config: Path) -> Any:
    from sorterd.cli.compose import load_config
    from sorterd.release.store import ReleaseStore

    cfg = load_config(config)
    m = cfg.models
    return ReleaseStore(cfg.resolve(m.dir), _trusted([cfg.resolve(k) for k in m.trusted_keys]),
                        int(m.max_release_mb * 1e6))


def cmd_verify(args: argparse.Namespace) -> int:
    from sorterd.configfile import ConfigError
    from sorterd.link.keys import KeyFileError
    from sorterd.release.verify import Refused, verify_release

    try:
        store = _open_store(args.config) if args.config is not None else None
        trusted = _trusted(args.trusted) if args.trusted else (store.trusted if store is not None else [])
        if not trusted:
            print("sorterd models verify: no trusted key: give --trusted PUBKEY or a --config with "
                  "[models] trusted_keys", file=sys.stderr)
            return 2
        floor = store.floor() if store is not None else None
        max_bytes = store.max_bytes if store is not None else int(ModelsDefaults.max_release_mb * 1e6)
        v = verify_release(args.bundle, trusted, floor, max_bytes)
    except Refused as exc:
        print(f"sorterd models verify: {args.bundle}: refused: {exc}", file=sys.stderr)
        return 1
    except (KeyFileError, ConfigError, OSError) as exc:
        print(f"sorterd models verify: {exc}", file=sys.stderr)
        return 2
    print(f"{args.bundle}: release {v.release} from {v.trainer}, signed by {v.key}, {v.total_bytes} bytes: "
          "every check passed")
    return 0


def cmd_offer(args: argparse.Namespace) -> int:
    from sorterd.link.keys import KeyFileError
    from sorterd.release.verify import Refused
    from sorterd.trainer.releases import OfferError, offer_bundle

    try:
        v, where = offer_bundle(args.bundle, args.data, _trusted(args.trusted))
    except Refused as exc:
        print(f"sorterd models offer: {args.bundle}: refused: {exc}", file=sys.stderr)
        return 1
    except (OfferError, KeyFileError, OSError) as exc:
        print(f"sorterd models offer: {exc}", file=sys.stderr)
        return 2
    print(f"release {v.release} offered: {where} (the trainer offers it to every sorter that runs an older one)")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from sorterd.configfile import ConfigError
    from sorterd.link.keys import KeyFileError
    from sorterd.release.store import StoreError
    from sorterd.release.verify import Refused

    command = args.models_command
    try:
        store = _open_store(args.config)
        if command == "stage":
            from sorterd.cli.compose import load_config
            from sorterd.release.swap import kit_policy, qa_gate

            cfg = load_config(args.config)
            v = store.stage(args.bundle, qa_gate(cfg.inference, kit_policy(cfg)))
            print(f"release {v.release} staged: {v.path}")
        elif command == "activate":
            store.activate(args.release)
        elif command == "rollback":
            store.rollback()
        elif command == "pin":
            store.pin(args.release)
        s = store.state()
        print(f"active {s.active}, previous {s.previous}, highest accepted {s.highest_accepted}, "
              f"pinned {s.pinned}; stored: {store.releases()}")
    except Refused as exc:
        print(f"sorterd models {command}: refused: {exc}", file=sys.stderr)
        return 1
    except (StoreError, KeyFileError, ConfigError, OSError) as exc:
        print(f"sorterd models {command}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from sorterd.parts.inference.tensorrt import TensorRTInferenceConfig

    cfg = TensorRTInferenceConfig()
    if args.config is not None:
        from sorterd.cli.compose import load_config

        loaded = load_config(args.config).inference
        if isinstance(loaded, TensorRTInferenceConfig):
            cfg = loaded
    changes = {k: v for k, v in (("precision", args.precision), ("max_batch", args.max_batch),
                                 ("engine_cache", args.engine_cache)) if v is not None}
    if "max_batch" in changes:
        changes["opt_batch"] = min(cfg.opt_batch, changes["max_batch"])
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except ValueError as exc:
        print(f"sorterd models build-engine: {exc}", file=sys.stderr)
        return 2
    return build_engine_ahead(args.bundle, cfg, sys.stdout)


def build_engine_ahead(bundle: Path, cfg: Any, out: TextIO, *, trt: Any = None, cudart: Any = None) -> int:
    """Build (or find in the cache) and parity-check the engine; 0 if it would go live, 1 if not, 2 if it cannot try."""
    from sorterd.parts.inference.tensorrt import TensorRTModel

    try:
        model = TensorRTModel(bundle, cfg, trt=trt, cudart=cudart, background=False)
    except ModelError as exc:
        print(f"sorterd models build-engine: {exc}", file=sys.stderr)
        return 2
    r = model.report
    model.close()
    where = f"{r.path}" if r.path else "(not written)"
    if r.state == "live":
        how = f"built in {r.build_s:.1f} s" if r.built else "already cached"
        print(f"{bundle}: engine {how}, golden parity passed: {where}", file=out)
        return 0
    print(f"{bundle}: engine {r.state}: {r.detail}", file=out)
    return 1
