"""TensorRT on an NVIDIA GPU: engine build time, bare-engine latency, compute/model ratio, parity.

    python bench/tensorrt.py [--bundle models/default] [--batches 1,2,4,8,16] [--iters 200] [--out FILE.json]

Parts, each run if its packages are there (torch is optional throughout):
  1. TensorRT (tensorrt + cuda-python): engine build seconds (cache bypassed), bare-engine
     latency p50/p99 per batch size, the model's compute/model ratio (predict_halves, i.e.
     preprocess + engine + softmax, over the bare engine call), parity vs onnxruntime CPU
     (max |dp| and argmax agreement on the golden inputs and on random crops), golden check.
  2. onnxruntime's CUDA provider (onnxruntime-gpu): latency p50/p99 per batch size.
  3. torch CUDA (no TensorRT needed): bare-model latency of weights.pt, fp32 and fp16 autocast.
It prints what it could not run, and exits 1 when TensorRT itself was not available.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# This file is named like the library: drop bench/ from the path so `import tensorrt` finds TensorRT.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sorterd.data.bundle import read_golden, read_manifest  # noqa: E402
from sorterd.parts.inference.golden import check_golden  # noqa: E402
from sorterd.parts.inference.onnxruntime import OnnxModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def timeit(fn: Any, iters: int) -> list[float]:
    for _ in range(10):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def tensorrt_part(bundle: Path, batches: list[int], iters: int) -> dict[str, Any]:
    from sorterd.parts.inference import tensorrt as t

    trt, cudart = t.import_tensorrt(), t.import_cudart()
    res: dict[str, Any] = {"tensorrt": trt.__version__}
    with tempfile.TemporaryDirectory() as cache_dir:
        cfg = t.TensorRTInferenceConfig(max_batch=max(batches), opt_batch=min(4, max(batches)), engine_cache=cache_dir,
                                        providers=("CPUExecutionProvider",))
        model = t.TensorRTModel(bundle, cfg, trt=trt, cudart=cudart, background=False)
        r = model.report
        res |= {"state": r.state, "detail": r.detail, "build_s": round(r.build_s, 1),
                "engine": r.path.name if r.path else None, "backend": model.backend}
        if r.state != "live":
            return res
        engine = model._live.engine if model._live else None  # noqa: SLF001 -- the bench times the bare engine
        assert engine is not None
        h, w = model.manifest.size
        rng = np.random.default_rng(0)
        per_batch = {}
        for n in batches:
            x = rng.standard_normal((n, 6, h, w)).astype(np.float32)
            bare = timeit(lambda x=x: model.thread.submit(lambda: engine.run(x)).result(), iters)
            halves = [(rng.integers(0, 255, (h, w, 3), dtype=np.uint8),) * 2 for _ in range(n)]
            full = timeit(lambda hv=halves: model.predict_halves(hv), iters)
            per_batch[n] = {"bare": pct(bare), "predict_halves": pct(full),
                            "compute_over_model": round(float(np.median(full) / np.median(bare)), 2)}
        res["latency"] = per_batch
        onnx = OnnxModel(bundle)
        golden = read_golden(bundle, model.manifest)
        crops = [rng.integers(0, 255, (64, h, w, 6), dtype=np.uint8)] + ([golden[0]] if golden else [])
        parity = []
        for c in crops:
            a, _ = model.predict(c)
            b, _ = onnx.predict(c)
            dp = max(float(np.abs(p.p_color - q.p_color).max()) for p, q in zip(a, b, strict=True))
            agree = float(np.mean([np.argmax(p.p_color) == np.argmax(q.p_color) and np.argmax(p.p_clarity) == np.argmax(q.p_clarity) for p, q in zip(a, b, strict=True)]))
            parity.append({"n": len(c), "max_dp_color": round(dp, 5), "argmax_agree": agree})
        res["parity_vs_onnxruntime_cpu"] = {"random": parity[0], "golden": parity[1] if golden else None}
        res["golden_check"] = check_golden(model, bundle) or "passed"
        model.close()
    return res


def ort_cuda_part(bundle: Path, batches: list[int], iters: int) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    m = OnnxModel(bundle, providers=("CUDAExecutionProvider",))
    h, w = m.manifest.size
    rng = np.random.default_rng(0)
    latency = {}
    for n in batches:
        x = rng.standard_normal((n, 6, h, w)).astype(np.float32)
        latency[n] = pct(timeit(lambda x=x: m.run(x), iters))
    return {"backend": m.backend, "latency": latency}


def torch_cuda_part(bundle: Path, batches: list[int], iters: int) -> dict[str, Any]:
    import torch

    from sorterd.train.mobilenet import MobileNetV3Small

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    tr = read_manifest(bundle).raw.get("training", {})
    net = MobileNetV3Small(width_mult=float(tr.get("width_mult", 1.0)), stone_stats=bool(tr.get("config", {}).get("stone_stats")),
                           stats_path=bool(tr.get("config", {}).get("stats_path")))
    net.load_state_dict(torch.load(bundle / "weights.pt", map_location="cpu", weights_only=True))
    net = net.cuda().eval()
    out: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "latency": {}}
    for n in batches:
        x = torch.randn(n, 6, 128, 128, device="cuda")
        for mode in ("fp32", "fp16"):
            def step(x: Any = x, mode: str = mode) -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=mode == "fp16"):
                    net(x)
                torch.cuda.synchronize()
            out["latency"][f"{n}/{mode}"] = pct(timeit(step, iters))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, Any] = {"machine": platform.node(), "python": platform.python_version()}
    missing: dict[str, str] = {}
    for name, part in (("tensorrt", tensorrt_part), ("onnxruntime_cuda", ort_cuda_part), ("torch_cuda", torch_cuda_part)):
        try:
            result[name] = part(args.bundle, batches, args.iters)
        except Exception as exc:  # noqa: BLE001 -- a part that cannot run is reported, the others still run
            missing[name] = " ".join(f"{type(exc).__name__}: {exc}".split())
    result["could_not_run"] = missing
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    for name, why in missing.items():
        print(f"bench/tensorrt.py: could not run {name}: {why}", file=sys.stderr)
    return 1 if "tensorrt" in missing or result.get("tensorrt", {}).get("state") != "live" else 0


if __name__ == "__main__":
    raise SystemExit(main())
