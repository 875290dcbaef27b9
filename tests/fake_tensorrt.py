"""Faithful fakes of the TensorRT 10 Python API and cuda-python's runtime API (`cuda.bindings.runtime`).

They keep the real libraries' shapes: cuda-python returns `(cudaError_t, value)` tuples and
device memory is only reachable through cudaMemcpy; TensorRT's builder needs a parsed network,
a profile covering the input, returns None on failure, and an execution context runs only
with every tensor address bound and the input shape inside the profile.  The "engine" runs
the ONNX itself with onnxruntime (FP16 engines round their input and output through float16),
so parity is real arithmetic.  Every call is logged with its thread, for order and ownership checks.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

MAGIC = b"FAKETRT\x00"


@dataclass
class CallLog:
    calls: list[tuple[str, int]] = field(default_factory=list)

    def add(self, name: str) -> None:
        self.calls.append((name, threading.get_ident()))

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def threads(self) -> set[int]:
        return {t for _, t in self.calls}


# ---------------------------------------------------------------------------- cuda-python
class cudaError_t(enum.IntEnum):  # noqa: N801 -- the library's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorDevicesUnavailable = 46
    cudaErrorLaunchFailure = 719


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t(int):  # noqa: N801 -- cuda-python's stream handle converts with int()
    pass


@dataclass
class Props:
    name: bytes
    major: int
    minor: int


class FakeCudart:
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind

    def __init__(self, log: CallLog, gpu: str = "Orin", cc: tuple[int, int] = (8, 7), memory: int = 1 << 30) -> None:
        self.log, self.gpu, self.cc, self.memory = log, gpu, cc, memory
        self.mem: dict[int, bytearray] = {}
        self._next = 0x7F0000000000
        self.streams: set[int] = set()
        self.fail_malloc = False

    def used(self) -> int:
        return sum(len(b) for b in self.mem.values())

    def cudaSetDevice(self, i: int) -> tuple[cudaError_t]:
        self.log.add("cudaSetDevice")
        return (cudaError_t.cudaSuccess if i == 0 else cudaError_t.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, i: int) -> tuple[cudaError_t, Props]:
        self.log.add("cudaGetDeviceProperties")
        return cudaError_t.cudaSuccess, Props(self.gpu.encode() + b"\x00" * 4, *self.cc)

    def cudaMalloc(self, n: int) -> tuple[cudaError_t, int]:
        self.log.add(f"cudaMalloc({n})")
        if self.fail_malloc or self.used() + n > self.memory:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        ptr, self._next = self._next, self._next + n + 256
        self.mem[ptr] = bytearray(n)
        return cudaError_t.cudaSuccess, ptr

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:
        self.log.add("cudaFree")
        return (cudaError_t.cudaSuccess if self.mem.pop(ptr, None) is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamCreate(self) -> tuple[cudaError_t, cudaStream_t]:
        self.log.add("cudaStreamCreate")
        s = cudaStream_t(0x5000 + len(self.streams) + 1)
        self.streams.add(int(s))
        return cudaError_t.cudaSuccess, s

    def cudaStreamDestroy(self, s: cudaStream_t) -> tuple[cudaError_t]:
        self.log.add("cudaStreamDestroy")
        self.streams.discard(int(s))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, s: cudaStream_t) -> tuple[cudaError_t]:
        self.log.add("cudaStreamSynchronize")
        return (cudaError_t.cudaSuccess if int(s) in self.streams else cudaError_t.cudaErrorInvalidValue,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: cudaMemcpyKind, s: cudaStream_t) -> tuple[cudaError_t]:
        self.log.add(f"cudaMemcpyAsync({kind.name[10:]},{n})")
        assert int(s) in self.streams, "copy on a stream that does not exist"
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            buf = self.mem[dst]
            assert n <= len(buf), f"H2D copy of {n} bytes into a {len(buf)}-byte buffer"
            buf[:n] = ctypes.string_at(src, n)
        else:
            buf = self.mem[src]
            assert n <= len(buf), f"D2H copy of {n} bytes from a {len(buf)}-byte buffer"
            ctypes.memmove(dst, bytes(buf[:n]), n)
        return (cudaError_t.cudaSuccess,)


# ---------------------------------------------------------------------------- tensorrt
class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


class Severity(enum.IntEnum):
    ERROR = 1
    WARNING = 2
    INFO = 3


class Logger:
    WARNING = Severity.WARNING
    ERROR = Severity.ERROR

    def __init__(self, severity: Severity = Severity.WARNING) -> None:
        self.severity = severity


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7


class BuilderFlag11(enum.IntEnum):  # TensorRT 11: no precision flags (strongly typed networks)
    TF32 = 7


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes | None = None
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def __str__(self) -> str:
        return f"In node -1: {self._desc}"


class OnnxParser:
    def __init__(self, network: Network, logger: Logger, fake: FakeTensorRT) -> None:
        self.network, self.fake, self.errors = network, fake, []  # type: list[ParserError]

    def parse(self, data: bytes) -> bool:
        self.fake.log.add("OnnxParser.parse")
        try:
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- the real parser reports errors, it does not raise
            self.errors.append(ParserError(f"ModelImporter: {type(exc).__name__}"))
            return False
        self.network.onnx = data
        self.network.inputs = [Tensor(i.name, tuple(-1 if isinstance(d, str) else d for d in i.shape)) for i in sess.get_inputs()]
        self.network.outputs = [Tensor(o.name, tuple(-1 if isinstance(d, str) else d for d in o.shape)) for o in sess.get_outputs()]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], mid: tuple[int, ...], hi: tuple[int, ...]) -> None:
        assert lo[0] <= mid[0] <= hi[0], (lo, mid, hi)
        self.shapes[name] = (tuple(lo), tuple(mid), tuple(hi))


class BuilderConfig:
    def __init__(self, fake: FakeTensorRT) -> None:
        self.fake = fake
        self.flags: set[Any] = set()
        self.pools: dict[Any, int] = {}
        self.profiles: list[Profile] = []

    def set_flag(self, flag: Any) -> None:
        self.fake.log.add(f"set_flag({flag.name})")
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: Any, n: int) -> None:
        self.pools[pool] = n

    def add_optimization_profile(self, p: Profile) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1


class HostMemory:
    """IHostMemory: a buffer (bytes(h) works), with nbytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data)


class Builder:
    def __init__(self, logger: Logger, fake: FakeTensorRT) -> None:
        self.fake = fake
        fake.log.add("Builder")

    def create_network(self, flags: int = 0) -> Network:
        self.fake.log.add(f"create_network({flags})")
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig(self.fake)

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> HostMemory | None:
        self.fake.log.add("build_serialized_network")
        self.fake.builds += 1
        if self.fake.fail_build or network.onnx is None or len(config.profiles) != 1:
            return None
        (inp,) = network.inputs
        prof = config.profiles[0].shapes.get(inp.name)
        assert prof is not None, "no profile for the dynamic input"
        assert all(d == p for d, p in zip(inp.shape[1:], prof[2][1:], strict=True)), (inp.shape, prof)
        fp16 = any(f.name == "FP16" for f in config.flags)
        header = {"version": self.fake.__version__, "fp16": fp16, "profile": [list(s) for s in prof],
                  "input": inp.name, "outputs": [[o.name, list(o.shape)] for o in network.outputs],
                  "strongly_typed": bool(network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))}
        h = json.dumps(header).encode()
        return HostMemory(MAGIC + len(h).to_bytes(4, "little") + h + network.onnx)


class Engine:
    def __init__(self, header: dict[str, Any], onnx: bytes, fake: FakeTensorRT) -> None:
        self.header, self.fake = header, fake
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.io = [header["input"], *[o[0] for o in header["outputs"]]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == self.header["input"] else TensorIOMode.OUTPUT if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name == self.header["input"]:
            return (-1, *self.header["profile"][2][1:])
        return tuple(dict(self.header["outputs"])[name])

    def create_execution_context(self) -> Context | None:
        self.fake.log.add("create_execution_context")
        return None if self.fake.fail_context else Context(self)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine, self.fake = engine, engine.fake
        self.addresses: dict[str, int] = {}
        self.input_shape: tuple[int, ...] | None = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.fake.log.add(f"set_input_shape({shape[0]})")
        lo, _, hi = self.engine.header["profile"]
        if name != self.engine.header["input"] or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.input_shape = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.fake.log.add(f"set_tensor_address({name})")
        if name not in self.engine.io or ptr not in self.fake.cudart.mem:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.fake.log.add("execute_async_v3")
        assert isinstance(stream_handle, int) and stream_handle in self.fake.cudart.streams
        if self.fake.lose_device:
            return False
        assert set(self.addresses) == set(self.engine.io), "execute with unbound tensors"
        assert self.input_shape is not None, "execute before set_input_shape"
        mem = self.fake.cudart.mem
        n = int(np.prod(self.input_shape)) * 4
        buf = mem[self.addresses[self.engine.header["input"]]]
        assert n <= len(buf)
        x = np.frombuffer(bytes(buf[:n]), dtype=np.float32).reshape(self.input_shape)
        if self.engine.header["fp16"]:
            x = x.astype(np.float16).astype(np.float32)
        names = [o[0] for o in self.engine.header["outputs"]]
        outs = self.engine.session.run(names, {self.engine.header["input"]: x})
        for name, y in zip(names, outs, strict=True):
            y = np.asarray(y, dtype=np.float32)
            if self.engine.header["fp16"]:
                y = y.astype(np.float16).astype(np.float32)
            y = y.copy()
            if y.ndim == 2:  # the heads' logits (the OOD score is one number per stone)
                y[:, 0] += self.fake.perturb  # a broken kernel: one class's logit off
                if self.fake.swap_heads:
                    y = y[:, ::-1]
            raw = np.ascontiguousarray(y).tobytes()
            out = mem[self.addresses[name]]
            assert len(raw) <= len(out), f"output {name}: {len(raw)} bytes into a {len(out)}-byte buffer"
            out[:len(raw)] = raw
        return True


class Runtime:
    def __init__(self, logger: Logger, fake: FakeTensorRT) -> None:
        self.fake = fake

    def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
        self.fake.log.add("deserialize_cuda_engine")
        if not data.startswith(MAGIC):
            return None
        n = int.from_bytes(data[8:12], "little")
        try:
            header = json.loads(data[12:12 + n])
            engine = Engine(header, data[12 + n:], self.fake)
        except Exception:  # noqa: BLE001 -- TensorRT logs an error and returns None
            return None
        if header["version"] != self.fake.__version__:
            return None  # engines are only valid for the TensorRT that built them
        return engine


class FakeTensorRT:
    """Stands in for the `tensorrt` module (pass as trt=), with its cudart (pass as cudart=)."""

    Logger = Logger
    TensorIOMode = TensorIOMode
    DataType = DataType
    MemoryPoolType = MemoryPoolType
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag

    def __init__(self, version: str = "10.3.0", **cuda: Any) -> None:
        self.__version__ = version
        self.BuilderFlag = BuilderFlag10 if version.split(".")[0] == "10" else BuilderFlag11
        self.log = CallLog()
        self.cudart = FakeCudart(self.log, **cuda)
        self.builds = 0
        self.fail_build = False
        self.fail_context = False
        self.lose_device = False
        self.perturb = 0.0
        self.swap_heads = False
        self.release = threading.Event()  # a build waits for this when `hold_build` is set
        self.hold_build = False

    def Builder(self, logger: Logger) -> Builder:  # noqa: N802 -- the library's class name
        if self.hold_build:
            assert self.release.wait(30), "test never released the build"
        return Builder(logger, self)

    def OnnxParser(self, network: Network, logger: Logger) -> OnnxParser:  # noqa: N802
        return OnnxParser(network, logger, self)

    def Runtime(self, logger: Logger) -> Runtime:  # noqa: N802
        return Runtime(logger, self)
