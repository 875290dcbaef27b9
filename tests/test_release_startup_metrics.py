"""Start-up runs the store's active release (the configured bundle only when none can run), and the
release metrics count what the watcher did: swaps, refusals by check, rollbacks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.metrics import Metrics
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.release.qa import KitPolicy, RecordedKit, save_kit
from sorterd.release.store import ReleaseStore
from sorterd.release.swap import HealthBounds, ReleasedModel, ReleaseWatcher, open_for_run
from tests.release_crash_child import Pipeline
from tests.release_fakes import DEFAULT, faithful_kit, make_release


@pytest.fixture
def store(tmp_path: Path) -> ReleaseStore:
    key = Ed25519PrivateKey.generate()
    s = ReleaseStore(tmp_path / "state", [key.public_key()], 50_000_000)
    for n in (1, 2):
        s.stage(make_release(tmp_path / f"r{n}", key, n), None)
    return s


def test_start_up_runs_the_active_release(store: ReleaseStore) -> None:
    cfg = load_config(config.sim_config_path())
    configured: list[str] = []

    def bundle() -> OnnxModel:
        configured.append("opened")
        return OnnxModel(DEFAULT)

    model, running = open_for_run(cfg, store, bundle)  # nothing active yet: the configured bundle
    assert running is None and configured == ["opened"]
    store.activate(2)
    model, running = open_for_run(cfg, store, bundle)
    assert running == 2 and isinstance(model, ReleasedModel) and model.version.endswith("@r2")
    assert configured == ["opened"]  # the bundle was not opened this time
    (store.path(2) / "model.onnx").write_bytes(b"tampered")
    model, running = open_for_run(cfg, store, bundle)  # a damaged active release never runs
    assert running is None and configured == ["opened", "opened"]


def _value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    v = m.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def test_release_metrics_count_swaps_refusals_and_rollbacks(store: ReleaseStore, tmp_path: Path) -> None:
    options = load_config(config.sim_config_path()).inference
    good = faithful_kit()
    kit: list[RecordedKit] = [good]
    policy = KitPolicy(lambda: save_kit(tmp_path / "kit.npz", kit[0]))
    store.activate(1)
    metrics = Metrics()
    pipeline = Pipeline(OnnxModel(DEFAULT))
    watcher = ReleaseWatcher(store, options, pipeline, metrics, HealthBounds(10, 1, 1, 1), 0.05, None, policy)  # type: ignore[arg-type]
    asyncio.run(watcher.step())
    assert watcher.running == 1 and _value(metrics, "sorterd_model_swaps_total") == 1
    kit[0] = RecordedKit(good.crops, [("inky", "opaque")] * len(good.labels))
    store.activate(2)
    asyncio.run(watcher.step())  # release 2 fails the kit: refused, release 1 keeps running
    assert watcher.running == 1 and pipeline.model.current().version.endswith("@r1")
    assert _value(metrics, "sorterd_model_refusals_total", {"check": "reference-kit"}) == 1
    assert _value(metrics, "sorterd_model_swaps_total") == 1
    kit[0] = good
    watcher.refused.clear()
    asyncio.run(watcher.step())
    assert watcher.running == 2 and _value(metrics, "sorterd_model_swaps_total") == 2
    first = pipeline.model.current()
    watcher._unhealthy(first.version, "test: sorts unlike release 1")  # what HealthWatch calls
    asyncio.run(watcher.step())
    assert store.state().active == 1 and _value(metrics, "sorterd_model_rollbacks_total") == 1
    assert pipeline.model.current().version.endswith("@r1")
