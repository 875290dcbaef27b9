"""Child of test_release_crashpoints: a sorter's release path, start to end, until the crash point
named in SORTERD_CRASH_AT kills it (sorterd.release.crash).  Start-up as the daemon does it (the
store opened, staging cleaned, the active release opened), then per cycle: release n (re-signed
from SRC with the key in KEYFILE, raw 32 bytes) staged with the QA gate (the kit in KITDIR),
activated, and swapped into a live model by the ReleaseWatcher -- CYCLES times.
    python tests/release_crash_child.py ROOT SRC KEYFILE KITDIR CYCLES [tensorrt]
With `tensorrt` the sorter's [inference] is the TensorRT backend (`trt_options`) on the faithful
fake of TensorRT and cuda-python (tests/fake_tensorrt.py, given to the backend with
`tensorrt.use_modules`): every open -- start-up, the QA gate of a stage, the watcher's -- builds
(or loads from the release's engine cache) an engine on the backend's own path, `engine.*`.  The
swapped-in release's engine is waited for before the next release is staged (releases come far
apart; and so the passes come in one order: the first stage's QA-gate build -- later stages find
it in staging/incoming.<pid>.engines, the ONNX being the same -- then each activated release's).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.metrics import Metrics
from sorterd.parts.inference import InferenceOptions, Model
from sorterd.parts.inference import tensorrt as trtmod
from sorterd.parts.inference.live import LiveModel
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.parts.inference.tensorrt import TensorRTInferenceConfig, TensorRTModel
from sorterd.release.qa import KitPolicy, latest_kit
from sorterd.release.store import ReleaseStore
from sorterd.release.swap import HealthBounds, ReleasedModel, ReleaseWatcher, open_active, qa_gate
from tests.fake_tensorrt import FakeTensorRT
from tests.release_fakes import DEFAULT, resign


def trt_options(base: InferenceOptions) -> TensorRTInferenceConfig:
    """The sim config's [inference] as the TensorRT backend (its fallback on the CPU, a small profile)."""
    return TensorRTInferenceConfig(model=base.model, threads=base.threads, max_batch=8, opt_batch=4,
                                   providers=("CPUExecutionProvider",))


class Pipeline:
    """What the watcher uses of the pipeline: the live model and the row observers."""

    def __init__(self, model: Model) -> None:
        self.model = LiveModel(model)
        self.row_observers: list[object] = []

    def swap_model(self, new: Model) -> Model:
        return self.model.swap(new)


async def main() -> None:
    root, src, keyfile, kitdir, cycles = (Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                                          Path(sys.argv[4]), int(sys.argv[5]))
    key = Ed25519PrivateKey.from_private_bytes(keyfile.read_bytes())
    options: InferenceOptions = load_config(config.sim_config_path()).inference
    if sys.argv[6:] == ["tensorrt"]:
        fake = FakeTensorRT()
        trtmod.use_modules(lambda: (fake, fake.cudart))
        options = trt_options(options)
    store = ReleaseStore(root, [key.public_key()], 50_000_000)
    store.clean_staging()
    running = open_active(store, options)
    kit = KitPolicy(lambda: latest_kit(kitdir, "sorter-1"))
    pipeline = Pipeline(running if running is not None else OnnxModel(DEFAULT))
    watcher = ReleaseWatcher(store, options, pipeline, Metrics(), HealthBounds(10, 1, 1, 1), 0.05,  # type: ignore[arg-type]
                             None if running is None else running.release, kit)
    work = root.parent / "incoming"
    first = store.state().highest_accepted + 1
    for n in range(first, first + cycles):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        resign(work, key, lambda m, n=n: m.update(release=n))
        store.stage(work, qa_gate(options, kit))
        store.activate(n)
        await watcher.step()
        assert watcher.running == n, (watcher.running, n)
        live = pipeline.model.current()
        if isinstance(live, ReleasedModel) and isinstance(live.inner, TensorRTModel):
            assert live.inner.ready.wait(120), "the engine build never ended"
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
