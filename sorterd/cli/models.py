"""`sorterd models ...`: model bundle tools.  `build-engine` builds (or checks) a bundle's TensorRT
engine ahead of time; later: sign / verify / list (the signed-release issue adds them here)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

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
