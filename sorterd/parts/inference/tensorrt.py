"""Dual-head inference with TensorRT on the Jetson (DESIGN §3, §4): `[inference] type = "tensorrt"`.

The engine is built on the device from the bundle's ONNX with the TensorRT Python API
(`Builder`, `OnnxParser`, `build_serialized_network`; loaded with
`Runtime.deserialize_cuda_engine`) and run with the TensorRT 10 calls (`set_input_shape`,
`set_tensor_address`, `execute_async_v3` on a CUDA stream).  One optimisation profile
covers batches 1..max_batch (opt = opt_batch): the pipeline hands one frame pair's stones
at a time; a larger pair is run in chunks.

* **Cache** (`engine_cache.py`): keyed by {ONNX sha256, TensorRT version, GPU name and compute
  capability, precision, profile and input shape}; a key mismatch is never loaded, a truncated
  or damaged file is rebuilt.
* **Background build**: until the engine is live, the same bundle runs on onnxruntime (CUDA
  provider if present, else CPU), and `backend` / the metrics / the log say so.  The engine
  goes live by one reference assignment, read once per call: a frame pair's stones run wholly
  on one backend, and the swap falls between two pairs.
* **One inference thread** (`InferenceThread`) makes every CUDA and TensorRT call: it owns the
  device context and the stream (CUDA contexts are per thread).  Workers preprocess their
  batch (the manifest's preprocessing, `preprocess.Preprocess`, shared with onnxruntime) and
  hand it over; an error there (out of memory, a lost device) is one clear log line and a
  fall-back to onnxruntime for the rest of the run, never a stop.
* **Parity** (`golden.check_golden`): before it goes live, the engine must reproduce the
  bundle's golden outputs within `GOLDEN_ATOL[precision]` with the same argmax and bin on
  every golden input; otherwise it is refused (and the reason logged).
* **API**: follows TensorRT 10 (JetPack 6); `detect_api` reads what the installed version
  offers -- TensorRT 11 drops the FP16 builder flag for strongly typed networks, where the
  precision is the ONNX's -- instead of failing at import.

Device buffers come from **cuda-python** (`cuda.bindings.runtime`, NVIDIA's own bindings) rather
than pycuda: prebuilt wheels for aarch64 and x86_64 (pycuda compiles against the CUDA toolkit on
the Jetson), the runtime API TensorRT's own samples use, and no per-thread context push/pop
(the primary context of the inference thread's device).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sorterd.configfile import opt
from sorterd.data.bundle import Manifest, ModelError, read_manifest
from sorterd.parts.inference import InferenceOptions, Prediction
from sorterd.parts.inference import engine_cache as cache
from sorterd.parts.inference.golden import GOLDEN_ATOL, check_golden
from sorterd.parts.inference.live import LiveRef
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.parts.inference.preprocess import Preprocess
from sorterd.parts.registry import Backend
from sorterd.release import crash

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'sorterd[jetson]' (PyPI wheels), or on a Jetson JetPack's TensorRT "
                "(apt install python3-libnvinfer) with pip install cuda-python")
T = TypeVar("T")


class EngineError(RuntimeError):
    """TensorRT or CUDA failed (build, load, run); the message is one line saying what and why."""


class CorruptEngine(EngineError):
    """TensorRT would not deserialize the engine bytes."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or a one-line ModelError naming what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelError(f"inference.type = 'tensorrt' needs the tensorrt Python package ({exc}): {INSTALL_HINT}") from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API (`cuda.bindings.runtime`; `cuda.cudart` before 12.6), or a ModelError."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[attr-defined,unused-ignore]
        return cudart
    except ImportError as exc:
        raise ModelError(f"inference.type = 'tensorrt' needs cuda-python for device buffers ({exc}): {INSTALL_HINT}") from None


Modules = Callable[[], tuple[Any, Any]]  # () -> (the tensorrt module, cuda-python's runtime module)


def installed_modules() -> tuple[Any, Any]:
    """The installed `tensorrt` and cuda runtime (a ModelError naming what to install if not)."""
    return import_tensorrt(), import_cudart()


_modules: Modules = installed_modules


def use_modules(modules: Modules | None) -> None:
    """Where a `TensorRTModel` opened without `trt=` / `cudart=` -- as `open_model` opens it: start-up,
    the release watcher -- takes its libraries from, for this whole process: the installed ones
    (None, the default), or a stand-in (the power-cut tests' child process runs the real release
    path on tests/fake_tensorrt.py this way)."""
    global _modules
    _modules = installed_modules if modules is None else modules


@dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT offers, read once (`detect_api`)."""

    version: str
    fp16_flag: Any  # trt.BuilderFlag.FP16; None from TensorRT 11 (strongly typed networks only)
    strongly_typed: Any  # trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED, or None

    @property
    def weakly_typed(self) -> bool:
        """The builder chooses layer precisions from flags (TensorRT <= 10)."""
        return self.fp16_flag is not None

    def network_flags(self) -> int:
        """create_network's flags: explicit batch is the default from TensorRT 10; strongly typed when
        that is the only kind (TensorRT 11)."""
        if self.weakly_typed or self.strongly_typed is None:
            return 0
        return 1 << int(self.strongly_typed)


def detect_api(trt: Any) -> TrtApi:
    """Read the installed TensorRT's API: version, FP16 flag (gone in 11), strongly typed flag;
    a version before 10 is refused in one line (its execution API differs)."""
    version = str(trt.__version__)
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ModelError(f"tensorrt.__version__ = {version!r}: not a version number") from None
    if major < 10:
        raise ModelError(f"TensorRT {version}: sorterd needs TensorRT 10 or later (JetPack 6; execute_async_v3): {INSTALL_HINT}")
    # The library's own enums say what it offers; this is the one place that asks.
    fp16 = getattr(trt.BuilderFlag, "FP16", None)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return TrtApi(version, fp16, strongly)


def has_fast_fp16(cc: tuple[int, int]) -> bool:
    """Compute capabilities with full-rate FP16: 5.3 (Nano), 6.0, 6.2 (TX2), 7.x and later (Xavier, Orin)."""
    return cc >= (7, 0) or cc in {(5, 3), (6, 0), (6, 2)}


def resolve_precision(requested: str, api: TrtApi, cc: tuple[int, int]) -> str:
    """The precision to build: 'auto' is FP16 where the GPU has fast FP16 and TensorRT takes the flag."""
    if not api.weakly_typed:
        if requested == "fp16":
            raise EngineError(f"inference.precision = 'fp16': TensorRT {api.version} builds strongly typed networks "
                              "(no FP16 builder flag), so the precision is the ONNX's (float32); set 'auto' or 'fp32'")
        return "fp32"
    if requested == "auto":
        return "fp16" if has_fast_fp16(cc) else "fp32"
    if requested == "fp16" and not has_fast_fp16(cc):
        raise EngineError(f"inference.precision = 'fp16': this GPU (sm{cc[0]}{cc[1]}) has no fast FP16; set 'auto' or 'fp32'")
    return requested


class Cuda:
    """The few CUDA runtime calls sorterd makes, each checked: an error becomes one EngineError line."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def call(self, what: str, result: Any) -> Any:
        """cuda-python returns (err, value...) tuples; a failure raises, naming the call and the error."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = err.name
            hint = " (out of GPU memory: lower inference.max_batch or stop other GPU users)" \
                if err == self.rt.cudaError_t.cudaErrorMemoryAllocation else ""
            raise EngineError(f"CUDA {what} failed: {name}{hint}")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def device(self, index: int) -> tuple[str, tuple[int, int]]:
        """Select the device (this thread's context) and say its name and compute capability."""
        self.call("cudaSetDevice", self.rt.cudaSetDevice(index))
        props = self.call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), (int(props.major), int(props.minor))


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def build_engine(trt: Any, api: TrtApi, onnx_bytes: bytes, manifest: Manifest, precision: str,
                 profile: tuple[int, int, int], workspace_bytes: int) -> bytes:
    """Parse the ONNX, build a serialized engine for one batch profile; EngineError says why not."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        said = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no error given"
        raise EngineError(f"TensorRT's ONNX parser refused model.onnx: {said}"[:400])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(api.fp16_flag)
    h, w = manifest.size
    opt_profile = builder.create_optimization_profile()
    lo, mid, hi = profile
    opt_profile.set_shape(manifest.input_name, (lo, 6, h, w), (mid, 6, h, w), (hi, 6, h, w))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT could not build the engine (its log says why; out of GPU memory is the usual "
                          "cause on a Jetson: lower inference.workspace_mb or inference.max_batch)")
    return bytes(serialized)


def _row_width(shape: tuple[int, ...]) -> int:
    """Values per stone of an output of shape (N, ...): (N, 3) logits -> 3, an (N,) score -> 1."""
    return math.prod(int(d) for d in shape[1:])


class TrtEngine:
    """A deserialized engine, its execution context, stream and device buffers (sized for max_batch).

    Made, run and closed on the inference thread only."""

    def __init__(self, trt: Any, cuda: Cuda, data: bytes, manifest: Manifest, max_batch: int) -> None:
        self.cuda, self.manifest, self.max_batch = cuda, manifest, max_batch
        self._buffers: list[int] = []
        self.stream: Any = None
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise CorruptEngine("TensorRT would not deserialize the engine (damaged, or built by another version)")
        self._check_io(trt)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda.call("cudaStreamCreate", cuda.rt.cudaStreamCreate())
        h, w = manifest.size
        self._in_shape = (6, h, w)
        # Every output the graph has is bound (TensorRT refuses to run with one unbound): both heads and,
        # in bundles from v003 on, the out-of-distribution score (the gate works on a Jetson too).
        self._outputs = (manifest.color_output, manifest.clarity_output,
                         *((manifest.ood.output,) if manifest.ood is not None else ()))
        self._widths = {name: _row_width(self.engine.get_tensor_shape(name)) for name in self._outputs}
        try:
            self.d_in = self._alloc(max_batch * 6 * h * w * 4)
            self.d_out = {name: self._alloc(max_batch * k * 4) for name, k in self._widths.items()}
            self._bind(manifest.input_name, self.d_in)
            for name, ptr in self.d_out.items():
                self._bind(name, ptr)
        except EngineError:
            self.close()
            raise

    def _check_io(self, trt: Any) -> None:
        m = self.manifest
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        outputs = [m.color_output, m.clarity_output, *([m.ood.output] if m.ood is not None else [])]
        for name, mode in ((m.input_name, trt.TensorIOMode.INPUT),
                           *((o, trt.TensorIOMode.OUTPUT) for o in outputs)):
            if name not in names or self.engine.get_tensor_mode(name) != mode:
                raise EngineError(f"engine has no {mode.name.lower()} tensor {name!r} (it has {sorted(names)})")
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineError(f"engine tensor {name!r} is {self.engine.get_tensor_dtype(name)}, expected FLOAT")

    def _alloc(self, nbytes: int) -> int:
        ptr = int(self.cuda.call(f"cudaMalloc({nbytes})", self.cuda.rt.cudaMalloc(nbytes)))
        self._buffers.append(ptr)
        return ptr

    def _bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise EngineError(f"TensorRT refused the device address of tensor {name!r}")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(N, 6, H, W) float32 -> both heads' logits and the OOD scores (None: a bundle without the
        gate), in chunks of max_batch."""
        if x.shape[1:] != self._in_shape:
            raise EngineError(f"input {x.shape}: the engine takes (N, {', '.join(map(str, self._in_shape))})")
        parts = [self._run_chunk(np.ascontiguousarray(x[i:i + self.max_batch], dtype=np.float32))
                 for i in range(0, len(x), self.max_batch)]
        cols = [np.concatenate([p[k] for p in parts]) for k in range(len(self._outputs))]
        return cols[0], cols[1], (cols[2].reshape(len(x)) if len(cols) > 2 else None)

    def _run_chunk(self, x: np.ndarray) -> list[np.ndarray]:
        rt, n = self.cuda.rt, len(x)
        if not self.context.set_input_shape(self.manifest.input_name, (n, *self._in_shape)):
            raise EngineError(f"TensorRT refused input shape {(n, *self._in_shape)} (profile 1..{self.max_batch})")
        self.cuda.call("cudaMemcpyAsync(H2D)", rt.cudaMemcpyAsync(
            self.d_in, x.ctypes.data, x.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT execute_async_v3 failed (the device may be lost: see the kernel log)")
        outs = []
        for name in self._outputs:
            host = np.empty((n, self._widths[name]), dtype=np.float32)
            self.cuda.call("cudaMemcpyAsync(D2H)", rt.cudaMemcpyAsync(
                host.ctypes.data, self.d_out[name], host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            outs.append(host)
        self.cuda.call("cudaStreamSynchronize", rt.cudaStreamSynchronize(self.stream))
        return outs

    def close(self) -> None:
        """Free the buffers and the stream (errors ignored: the device may already be gone)."""
        rt = self.cuda.rt
        for ptr in self._buffers:
            rt.cudaFree(ptr)
        self._buffers = []
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None


class InferenceThread:
    """The one thread that makes CUDA and TensorRT calls (it owns the device context and the stream)."""

    def __init__(self, name: str = "sorterd-tensorrt") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 -- handed to the caller through the future
                    fut.set_exception(exc)

    def close(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)


@dataclass(frozen=True)
class TensorRTInferenceConfig(InferenceOptions):
    type: str = opt("tensorrt", "Backend: tensorrt (engine built on the device, onnxruntime until it is ready).",
                    choices=("tensorrt",))
    precision: str = opt("auto", "Engine precision: auto (FP16 where the GPU has fast FP16 and TensorRT takes the "
                         "flag, else FP32), fp16, fp32.", choices=("auto", "fp16", "fp32"))
    engine_cache: str = opt("", "Engine cache directory; '' = '<bundle>.engines' beside the bundle directory.")
    max_batch: int = opt(16, "Largest batch (stones per frame pair) the engine's profile takes; more run in chunks.",
                         minval=1, maxval=256)
    opt_batch: int = opt(4, "Batch size TensorRT optimises for (at most max_batch).", minval=1, maxval=256)
    workspace_mb: int = opt(512, "Builder workspace memory (MB).", minval=16, maxval=65536)
    device: int = opt(0, "CUDA device index.", minval=0, maxval=15)
    fallback: str = opt("onnxruntime", "What runs the bundle until the engine is live, and if it fails.",
                        choices=("onnxruntime",))
    threads: int = opt(1, "Fallback onnxruntime's intra-op threads.", minval=1, maxval=64)
    providers: tuple[str, ...] = opt(("CUDAExecutionProvider", "CPUExecutionProvider"),
                                     "Fallback onnxruntime's execution providers, in order (those present are used).")

    def __post_init__(self) -> None:
        if self.opt_batch > self.max_batch:
            from sorterd.configfile import ConfigError
            raise ConfigError([f"inference.opt_batch = {self.opt_batch} must not exceed inference.max_batch = {self.max_batch}"])


class _EngineModel:
    """A live engine seen as a `Model` (for the parity check, run on the inference thread)."""

    def __init__(self, engine: TrtEngine, pre: Preprocess, version: str, backend: str) -> None:
        self.engine, self._pre, self.manifest, self._version, self._backend = engine, pre, pre.manifest, version, backend

    @property
    def version(self) -> str:
        return self._version

    @property
    def backend(self) -> str:
        return self._backend

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        t0 = time.perf_counter()
        color, clarity, ood = self.engine.run(self._pre.crops(crops_hwc))
        return self._pre.predictions(color, clarity, ood), time.perf_counter() - t0

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        t0 = time.perf_counter()
        color, clarity, ood = self.engine.run(self._pre.halves(halves))
        return self._pre.predictions(color, clarity, ood), time.perf_counter() - t0

    def close(self) -> None:
        """Nothing of its own: the engine belongs to the `TensorRTModel` (closed on its thread there)."""


@dataclass
class EngineReport:
    """How preparing the engine went (for the CLI, the log and the tests)."""

    state: str = "building"  # building | live | refused | failed
    detail: str = ""
    key: cache.EngineKey | None = None
    path: Path | None = None
    built: bool = False
    build_s: float = 0.0
    rebuilt_why: str = ""  # why the cache's engine was not used when one was built ("no cached engine ...", ...)


class TensorRTModel:
    """The bundle on a TensorRT engine once it is built, checked and live; on onnxruntime until then.

    Threads: `predict*` run on the pipeline's workers (preprocessing there), the engine calls on
    the inference thread; `_live` (a `LiveRef`, the one swap mechanism of `inference/live.py`) is
    written by the inference thread (going live) or by a worker (falling back), and read once per call."""

    def __init__(self, bundle: Path, cfg: TensorRTInferenceConfig, *, trt: Any = None, cudart: Any = None,
                 fallback: OnnxModel | None = None, background: bool = True) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.manifest = read_manifest(bundle)
        if trt is None or cudart is None:
            trt, cudart = _modules()
        self.trt = trt
        self.api = detect_api(self.trt)
        self.cuda = Cuda(cudart)
        self.onnx = fallback if fallback is not None else OnnxModel(bundle, cfg.threads, cfg.providers)
        self._pre = Preprocess(self.manifest)
        self._live: LiveRef[_EngineModel | None] = LiveRef(None)
        self.report = EngineReport()
        self.ready = threading.Event()  # set once the engine is live, refused or failed
        self.thread = InferenceThread()
        log.info("inference: %s runs on %s until its TensorRT engine is ready", self.manifest.version, self.onnx.backend)
        job = self.thread.submit(self._prepare)
        if not background:
            job.result()

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def backend(self) -> str:
        live = self._live.get()
        return live.backend if live is not None else self.onnx.backend

    @property
    def status(self) -> str:
        """One line: what runs the model and why."""
        r = self.report
        if r.state == "live":
            return f"{self.backend} (engine {r.path.name if r.path else '?'})"
        if r.state == "building":
            return f"{self.onnx.backend} while the TensorRT engine is built"
        return f"{self.onnx.backend}: TensorRT engine {r.state}: {r.detail}"

    def cache_dir(self) -> Path:
        return Path(self.cfg.engine_cache).expanduser() if self.cfg.engine_cache else cache.default_cache_dir(self.bundle)

    # ------------------------------------------------------------------ the inference thread
    def _prepare(self) -> None:
        """Key, cache or build, load, parity check, go live (or say why not). Inference thread only."""
        try:
            self._go_live(self._load_or_build())
        except (EngineError, ModelError, OSError) as exc:
            self._not_live("failed", str(exc))
        except Exception as exc:  # TensorRT's own errors, a bug: never a silent "building" for good
            log.exception("inference: the TensorRT engine's preparation failed unexpectedly")
            self._not_live("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.ready.set()

    def _key(self) -> cache.EngineKey:
        gpu, cc = self.cuda.device(self.cfg.device)
        precision = resolve_precision(self.cfg.precision, self.api, cc)
        h, w = self.manifest.size
        return cache.EngineKey(self.manifest.onnx_sha256, self.api.version, gpu, f"{cc[0]}.{cc[1]}", precision,
                               (1, self.cfg.opt_batch, self.cfg.max_batch), (6, h, w))

    def _load_or_build(self) -> TrtEngine:
        key = self.report.key = self._key()
        folder = self.cache_dir()
        left = cache.clean(folder)
        if left:
            log.warning("inference: removed what a stop left mid-write in %s: %s", folder, ", ".join(left))
        data, why = cache.load(folder, key)
        if data is not None:
            try:
                engine = TrtEngine(self.trt, self.cuda, data, self.manifest, self.cfg.max_batch)
                self.report.path = folder / key.file_name()
                log.info("inference: TensorRT engine %s loaded from the cache", key.file_name())
                return engine
            except CorruptEngine as exc:
                why = f"{key.file_name()}: {exc}"
        self.report.rebuilt_why = why
        log.warning("inference: building the TensorRT engine (%s); minutes on a Jetson, onnxruntime meanwhile", why)
        t0 = time.monotonic()
        data = build_engine(self.trt, self.api, (self.bundle / "model.onnx").read_bytes(), self.manifest,
                            key.precision, key.profile, self.cfg.workspace_mb << 20)
        self.report.build_s, self.report.built = time.monotonic() - t0, True
        crash.point("engine.built")
        self.report.path = cache.store(folder, key, data)
        crash.point("engine.stored")
        log.info("inference: TensorRT engine built in %.1f s: %s", self.report.build_s, self.report.path)
        return TrtEngine(self.trt, self.cuda, data, self.manifest, self.cfg.max_batch)

    def _go_live(self, engine: TrtEngine) -> None:
        key = self.report.key
        precision = key.precision if key else "fp32"
        candidate = _EngineModel(engine, self._pre, self.version, f"tensorrt:{precision}")
        problems = check_golden(candidate, self.bundle, GOLDEN_ATOL[precision])
        if problems:
            engine.close()
            self._not_live("refused", "golden-input parity: " + "; ".join(problems))
            return
        self._live.swap(candidate)  # the swap: the next call (the next frame pair) runs on the engine
        self.report.state = "live"
        log.info("inference: %s now runs on %s (golden parity passed)", self.version, candidate.backend)

    def _not_live(self, state: str, detail: str) -> None:
        self.report.state, self.report.detail = state, detail
        log.error("inference: TensorRT engine %s: %s; %s stays on %s", state, detail, self.version, self.onnx.backend)

    # ------------------------------------------------------------------ the workers
    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        return self._classify(self._pre.crops(crops_hwc))

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        return self._classify(self._pre.halves(halves))

    def _classify(self, x: np.ndarray) -> tuple[list[Prediction], float]:
        live = self._live.get()  # read once: this batch runs wholly on one backend
        if live is not None:
            try:
                (color, clarity, ood), model_s = self.thread.submit(lambda: _timed(live.engine.run, x)).result()
                return self._pre.predictions(color, clarity, ood), model_s
            except EngineError as exc:
                self._fall_back(live, str(exc))
        (color, clarity, ood), model_s = _timed(self.onnx.run_all, x)
        return self._pre.predictions(color, clarity, ood), model_s

    def _fall_back(self, live: _EngineModel, reason: str) -> None:
        if not self._live.replace_if(live, None):
            return  # another worker already fell back
        self._not_live("failed", f"at run time: {reason}")
        self.thread.submit(live.engine.close)

    def close(self) -> None:
        """Free the engine on its thread, stop the thread, drop the fallback session; idempotent."""
        live = self._live.swap(None)
        if live is not None:
            self.thread.submit(live.engine.close)
        self.thread.close()
        self.onnx.close()


Outputs = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # both heads' logits, the OOD scores (or None)


def _timed(fn: Callable[[np.ndarray], Outputs], x: np.ndarray) -> tuple[Outputs, float]:
    """The bare model call and its seconds: logits and OOD scores alike (the gate needs them on a
    Jetson too, on the engine and on the onnxruntime fallback)."""
    t0 = time.perf_counter()
    out = fn(x)
    return out, time.perf_counter() - t0


BACKEND = Backend("inference", "tensorrt", TensorRTInferenceConfig)
