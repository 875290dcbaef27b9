"""The TensorRT backend against faithful fakes of TensorRT 10/11 and cuda-python (tests/fake_tensorrt.py)."""

from __future__ import annotations

import builtins
import dataclasses
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import FakeTensorRT

from sorterd.data.bundle import ModelError, read_golden, read_manifest
from sorterd.parts.inference import engine_cache as cache
from sorterd.parts.inference import tensorrt as trtmod
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.parts.inference.tensorrt import TensorRTInferenceConfig, TensorRTModel

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def bundle_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("b") / "v"
    shutil.copytree(DEFAULT, dst, ignore=shutil.ignore_patterns("weights.pt"))
    return dst


@pytest.fixture
def bundle(bundle_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_src, dst)
    return dst


CFG = TensorRTInferenceConfig(max_batch=8, opt_batch=4, providers=("CPUExecutionProvider",))


def open_model(bundle: Path, fake: FakeTensorRT, cfg: TensorRTInferenceConfig = CFG, **kw: Any) -> TensorRTModel:
    model = TensorRTModel(bundle, cfg, trt=fake, cudart=fake.cudart, **kw)
    assert model.ready.wait(60)
    return model


def halves(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
            for _ in range(n)]


def test_build_from_onnx_calls_in_order_on_one_thread(bundle: Path) -> None:
    fake = FakeTensorRT()
    model = open_model(bundle, fake)
    assert model.report.state == "live", model.report.detail
    assert model.backend == "tensorrt:fp16" and fake.builds == 1
    names = fake.log.names()
    order = ["cudaSetDevice", "Builder", "OnnxParser.parse", "set_flag(FP16)", "build_serialized_network",
             "deserialize_cuda_engine", "create_execution_context", "cudaStreamCreate"]
    assert [n for n in names if n in order] == order
    # buffers sized for max_batch: input 8x6x128x128 floats, each head 8x3 floats
    assert f"cudaMalloc({8 * 6 * 128 * 128 * 4})" in names and names.count(f"cudaMalloc({8 * 3 * 4})") == 2
    preds, _ = model.predict_halves(halves(11))  # 11 > max_batch: two chunks
    assert len(preds) == 11
    tail = fake.log.names()[len(names):]
    run = ["set_input_shape(8)", f"cudaMemcpyAsync(HostToDevice,{8 * 6 * 128 * 128 * 4})", "execute_async_v3",
           f"cudaMemcpyAsync(DeviceToHost,{8 * 3 * 4})", f"cudaMemcpyAsync(DeviceToHost,{8 * 3 * 4})",
           f"cudaMemcpyAsync(DeviceToHost,{8 * 4})",  # the OOD score, one float per stone
           "cudaStreamSynchronize", "set_input_shape(3)"]
    assert tail[:len(run)] == run
    # every CUDA/TensorRT call ran on the one inference thread
    assert fake.log.threads() == {model.thread.ident}
    # and gives onnxruntime's answers
    ref, _ = OnnxModel(bundle).predict_halves(halves(11))
    for a, b in zip(preds, ref, strict=True):
        assert np.abs(a.p_color - b.p_color).max() < 0.02 and np.abs(a.p_clarity - b.p_clarity).max() < 0.02
        # the out-of-distribution gate's score comes through the engine too (the shipped bundle has it)
        assert a.ood is not None and b.ood is not None and abs(a.ood - b.ood) < 0.05 * max(1.0, abs(b.ood))
    key = model.report.key
    assert key is not None and (bundle.parent / "bundle.engines" / key.file_name()).exists()
    assert key.file_name().startswith(f"model.onnx.{read_manifest(bundle).onnx_sha256[:16]}.trt10.3.0.orin.sm87.fp16.b1-4-8.6x128x128")
    model.close()


def test_cache_hit_builds_nothing(bundle: Path) -> None:
    open_model(bundle, FakeTensorRT()).close()
    fake = FakeTensorRT()
    model = open_model(bundle, fake)
    assert model.report.state == "live" and fake.builds == 0 and not model.report.built
    model.close()


@pytest.mark.parametrize("change", ["onnx", "trt", "gpu", "cc", "precision", "profile"])
def test_cache_key_mismatch_is_never_loaded(bundle: Path, change: str) -> None:
    open_model(bundle, FakeTensorRT()).close()
    cfg, fake = CFG, FakeTensorRT()
    if change == "onnx":
        raw = read_manifest(bundle).raw
        raw["onnx_sha256"] = "0" * 64  # another ONNX: OnnxModel is replaced by the fake's fallback below
        fallback = OnnxModel(bundle)
        (bundle / "manifest.json").write_text(__import__("json").dumps(raw))
        model = TensorRTModel(bundle, cfg, trt=fake, cudart=fake.cudart, fallback=fallback)
        assert model.ready.wait(60)
    else:
        if change == "trt":
            fake = FakeTensorRT("10.4.1")
        elif change == "gpu":
            fake = FakeTensorRT(gpu="Xavier")
        elif change == "cc":
            fake = FakeTensorRT(cc=(7, 2))
        elif change == "precision":
            cfg = dataclasses.replace(CFG, precision="fp32")
        elif change == "profile":
            cfg = dataclasses.replace(CFG, max_batch=16)
        model = open_model(bundle, fake, cfg)
    assert fake.builds == 1, "a cached engine for another key was loaded"
    assert "deserialize_cuda_engine" in fake.log.names()
    assert len(list((bundle.parent / "bundle.engines").glob("*.engine"))) == 2
    model.close()


def test_sidecar_key_mismatch_under_the_same_name_is_refused(bundle: Path) -> None:
    first = open_model(bundle, FakeTensorRT())
    key = first.report.key
    first.close()
    assert key is not None
    side = bundle.parent / "bundle.engines" / (key.file_name() + ".json")
    meta = __import__("json").loads(side.read_text())
    meta["key"]["gpu_name"] = "Orin (another)"
    side.write_text(__import__("json").dumps(meta))
    data, why = cache.load(side.parent, key)
    assert data is None and "another key" in why


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage-with-sidecar"])
def test_corrupt_engine_is_rebuilt(bundle: Path, damage: str) -> None:
    first = open_model(bundle, FakeTensorRT())
    key = first.report.key
    first.close()
    assert key is not None
    folder = bundle.parent / "bundle.engines"
    path = folder / key.file_name()
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:  # sidecar agrees, but TensorRT will not deserialize the bytes
        cache.store(folder, key, b"not an engine")
    fake = FakeTensorRT()
    model = open_model(bundle, fake)
    assert fake.builds == 1 and model.report.state == "live"
    assert cache.load(folder, key)[0] is not None  # the rebuilt engine is cached whole
    model.close()


def test_a_cut_writes_temporary_files_are_removed_before_the_cache_is_used(bundle: Path) -> None:
    """A power cut mid-write leaves `.<name>.*.tmp` (engine or sidecar, as large as an engine); the
    next open removes them and the engine is rebuilt and stored whole (tests/test_release_crashpoints.py
    cuts the real write: engine.writing)."""
    first = open_model(bundle, FakeTensorRT())
    key = first.report.key
    first.close()
    assert key is not None
    folder = bundle.parent / "bundle.engines"
    for p in folder.glob("model.onnx.*"):
        p.unlink()
    cut = [folder / f".{key.file_name()}.x1y2.tmp", folder / f".{key.file_name()}.json.z3w4.tmp"]
    for p in cut:
        p.write_bytes(b"half an engine")
    fake = FakeTensorRT()
    model = open_model(bundle, fake)
    assert model.report.state == "live" and fake.builds == 1 and "no cached engine" in model.report.rebuilt_why
    assert not any(p.exists() for p in cut) and not list(folder.glob(".*.tmp"))
    assert cache.load(folder, key)[0] is not None
    model.close()


def test_clean_never_removes_a_temporary_file_a_writer_is_still_writing(tmp_path: Path) -> None:
    """Another process's writer (the CLI's build-engine beside the daemon) holds the folder's flock
    from its temporary file to its rename: `clean` waits for it instead of removing the file under it."""
    import fcntl
    import os
    import time

    folder = tmp_path / "engines"
    folder.mkdir()
    fd = os.open(folder / cache.LOCK, os.O_RDWR | os.O_CREAT)  # its own open file: a flock apart from clean's
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = folder / ".model.onnx.abc.engine.q1.tmp"
    tmp.write_bytes(b"being written")
    removed: list[list[str]] = []
    cleaner = threading.Thread(target=lambda: removed.append(cache.clean(folder)))
    cleaner.start()
    time.sleep(0.3)
    assert tmp.exists() and cleaner.is_alive(), "clean did not wait for the writer"
    os.replace(tmp, folder / "model.onnx.abc.engine")
    os.close(fd)  # the writer is done: its lock goes with its descriptor
    cleaner.join(10)
    assert removed == [[]] and (folder / "model.onnx.abc.engine").read_bytes() == b"being written"
    stale = folder / ".model.onnx.abc.engine.q2.tmp"  # nobody writing: a cut's leftover
    stale.write_bytes(b"cut")
    assert cache.clean(folder) == [stale.name] and not stale.exists()


class SlowOnnx(OnnxModel):
    """onnxruntime whose next run waits (to hold a frame pair in flight across the swap)."""

    def __init__(self, bundle: Path) -> None:
        super().__init__(bundle)
        self.entered, self.go = threading.Event(), threading.Event()
        self.hold = False
        self.runs = 0

    def run_all(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        self.runs += 1
        if self.hold:
            self.entered.set()
            assert self.go.wait(30)
        return super().run_all(x)


def test_background_build_runs_onnxruntime_meanwhile_and_swaps_between_pairs(bundle: Path) -> None:
    fake = FakeTensorRT()
    fake.hold_build = True
    onnx = SlowOnnx(bundle)
    model = TensorRTModel(bundle, CFG, trt=fake, cudart=fake.cudart, fallback=onnx)
    assert not model.ready.is_set() and model.backend == "onnxruntime:CPUExecutionProvider"
    assert "while the TensorRT engine is built" in model.status
    model.predict_halves(halves(2))
    assert onnx.runs == 1 and "execute_async_v3" not in fake.log.names()
    # a pair in flight on onnxruntime while the engine goes live finishes on onnxruntime
    onnx.hold = True
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(model.predict_halves(halves(3))))
    worker.start()
    assert onnx.entered.wait(30)
    fake.release.set()
    assert model.ready.wait(60) and model.backend == "tensorrt:fp16"
    executes = fake.log.names().count("execute_async_v3")  # the golden parity check's
    onnx.go.set()
    worker.join(30)
    assert len(result[0][0]) == 3 and fake.log.names().count("execute_async_v3") == executes
    # the next pair runs on the engine
    onnx.hold = False
    model.predict_halves(halves(2))
    assert onnx.runs == 2 and fake.log.names().count("execute_async_v3") == executes + 1
    model.close()


@pytest.mark.parametrize("broken", ["perturb", "swap_heads"])
def test_parity_mismatch_refuses_the_engine(bundle: Path, broken: str) -> None:
    fake = FakeTensorRT()
    if broken == "perturb":
        fake.perturb = 0.5
    else:
        fake.swap_heads = True
    model = open_model(bundle, fake)
    assert model.report.state == "refused" and "golden-input parity" in model.report.detail
    assert model.backend.startswith("onnxruntime") and "refused" in model.status
    n = fake.log.names().count("execute_async_v3")
    model.predict_halves(halves(2))
    assert fake.log.names().count("execute_async_v3") == n
    model.close()


def test_bundle_without_golden_is_refused(bundle: Path) -> None:
    raw = read_manifest(bundle).raw
    del raw["golden"]
    (bundle / "manifest.json").write_text(__import__("json").dumps(raw))
    model = open_model(bundle, FakeTensorRT())
    assert model.report.state == "refused" and "no golden" in model.report.detail


def test_golden_files_are_checked(bundle: Path) -> None:
    m = read_manifest(bundle)
    assert read_golden(bundle, m) is not None
    (bundle / "golden_outputs.npy").write_bytes((bundle / "golden_outputs.npy").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match=r"golden_outputs.npy: sha256 .* does not match the manifest's golden.outputs"):
        read_golden(bundle, m)


def test_out_of_memory_at_load_falls_back(bundle: Path) -> None:
    fake = FakeTensorRT(memory=1 << 20)  # 1 MiB: the input buffer does not fit
    model = open_model(bundle, fake)
    assert model.report.state == "failed" and "cudaErrorMemoryAllocation" in model.report.detail
    assert "out of GPU memory" in model.report.detail and fake.cudart.mem == {}  # nothing leaked
    preds, _ = model.predict_halves(halves(2))
    assert len(preds) == 2 and model.backend.startswith("onnxruntime")
    model.close()


def test_lost_device_at_run_time_falls_back_without_losing_the_pair(bundle: Path) -> None:
    fake = FakeTensorRT()
    model = open_model(bundle, fake)
    assert model.backend == "tensorrt:fp16"
    fake.lose_device = True
    preds, _ = model.predict_halves(halves(4))
    assert len(preds) == 4 and model.backend.startswith("onnxruntime")
    assert "execute_async_v3 failed" in model.status
    model.close()
    assert fake.cudart.mem == {} and fake.cudart.streams == set()


def test_build_failure_falls_back(bundle: Path) -> None:
    fake = FakeTensorRT()
    fake.fail_build = True
    model = open_model(bundle, fake)
    assert model.report.state == "failed" and "could not build the engine" in model.report.detail


def test_missing_tensorrt_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_trt(name: str, *args: Any, **kw: Any) -> Any:
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(ModelError) as exc:
        trtmod.import_tensorrt()
    msg = str(exc.value)
    assert "\n" not in msg and "pip install 'sorterd[jetson]'" in msg and "python3-libnvinfer" in msg


def test_tensorrt_11_api_is_detected(bundle: Path) -> None:
    fake = FakeTensorRT("11.0.0")
    api = trtmod.detect_api(fake)
    assert not api.weakly_typed and api.network_flags() == 1 << 1
    model = open_model(bundle, fake)  # precision 'auto' -> fp32, strongly typed, no FP16 flag
    assert model.report.state == "live" and model.backend == "tensorrt:fp32"
    assert "create_network(2)" in fake.log.names() and "set_flag(FP16)" not in fake.log.names()
    model.close()
    fp16 = open_model(bundle, FakeTensorRT("11.0.0"), dataclasses.replace(CFG, precision="fp16"))
    assert fp16.report.state == "failed" and "strongly typed" in fp16.report.detail


def test_tensorrt_10_api_and_old_versions(bundle: Path) -> None:
    api = trtmod.detect_api(FakeTensorRT("10.3.0"))
    assert api.weakly_typed and api.network_flags() == 0
    with pytest.raises(ModelError, match="needs TensorRT 10 or later"):
        trtmod.detect_api(FakeTensorRT("8.6.1"))


def test_precision_follows_the_gpu() -> None:
    api = trtmod.detect_api(FakeTensorRT())
    assert trtmod.resolve_precision("auto", api, (8, 7)) == "fp16"
    assert trtmod.resolve_precision("auto", api, (6, 1)) == "fp32"
    with pytest.raises(trtmod.EngineError, match="no fast FP16"):
        trtmod.resolve_precision("fp16", api, (6, 1))


def test_opt_batch_above_max_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="inference.opt_batch = 9 must not exceed inference.max_batch = 8"):
        TensorRTInferenceConfig(max_batch=8, opt_batch=9)


def test_models_build_engine_ahead_then_cache_hit(bundle: Path) -> None:
    import io

    from sorterd.cli.models import build_engine_ahead

    out = io.StringIO()
    fake = FakeTensorRT()
    assert build_engine_ahead(bundle, CFG, out, trt=fake, cudart=fake.cudart) == 0
    assert "built in" in out.getvalue() and "golden parity passed" in out.getvalue()
    fake2 = FakeTensorRT()
    assert build_engine_ahead(bundle, CFG, out, trt=fake2, cudart=fake2.cudart) == 0
    assert fake2.builds == 0 and "already cached" in out.getvalue()
    bad = FakeTensorRT()
    bad.swap_heads = True
    (bundle.parent / "bundle.engines").rename(bundle.parent / "old.engines")
    assert build_engine_ahead(bundle, CFG, out, trt=bad, cudart=bad.cudart) == 1
    assert "engine refused: golden-input parity" in out.getvalue()


def test_cli_without_tensorrt_says_what_to_install(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from sorterd.cli import main

    assert main(["models", "build-engine", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'sorterd[jetson]'" in err


def test_an_unexpected_error_while_preparing_the_engine_is_a_failure_not_building_forever(
        bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT raising what it raises (a RuntimeError from a binding, say) ends the preparation as
    "failed" with the reason, and onnxruntime keeps sorting: never a report stuck at "building"."""
    fake = FakeTensorRT()

    def broken(*args: Any) -> None:
        raise RuntimeError("pybind11: CUDA initialization failure with error 999")

    monkeypatch.setattr(fake, "Builder", broken)
    model = open_model(bundle, fake)
    assert model.report.state == "failed" and "RuntimeError: pybind11: CUDA initialization failure" in model.report.detail
    preds, _ = model.predict_halves(halves(3))
    assert len(preds) == 3 and model.backend.startswith("onnxruntime")
    assert all(p.ood is not None for p in preds)  # the fallback keeps the out-of-distribution gate
