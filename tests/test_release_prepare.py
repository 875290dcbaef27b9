"""The helper process (sorterd.release.prepare; issue 12 item 5, "a swap must not delay stones", and
"nothing a download does may delay a stone"): a newly active release is verified and QA-checked,
and a downloaded one staged, in a child process at the lowest priority; a refusal there names its
check and nothing is swapped or staged; a helper that times out or dies is a clear refusal, the
running release keeps running and nothing of a download is left in releases/ or staging/."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.metrics import Metrics
from sorterd.parts.inference import InferenceOptions
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.release import prepare
from sorterd.release.prepare import Retries
from sorterd.release.qa import KitPolicy, save_kit
from sorterd.release.store import ReleaseStore
from sorterd.release.swap import HealthBounds, ReleaseWatcher
from sorterd.release.verify import Refused
from tests.release_crash_child import Pipeline
from tests.release_fakes import DEFAULT, faithful_kit, helper_dies_at, make_release

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ReleaseStore:
    s = ReleaseStore(tmp_path / "state", [key.public_key()], 50_000_000)
    for n in (1, 2):
        s.stage(make_release(tmp_path / f"r{n}", key, n), None)
    return s


@pytest.fixture
def options() -> InferenceOptions:
    return load_config(config.sim_config_path()).inference


def _watcher(store: ReleaseStore, options: InferenceOptions, tmp_path: Path,
             timeout_s: float = 120.0) -> tuple[ReleaseWatcher, Pipeline, Metrics]:
    kit = save_kit(tmp_path / "kit.npz", faithful_kit())
    metrics, pipeline = Metrics(), Pipeline(OnnxModel(DEFAULT))
    watcher = ReleaseWatcher(store, options, pipeline, metrics, HealthBounds(10, 1, 1, 1), 0.05,  # type: ignore[arg-type]
                             None, KitPolicy(lambda: kit), timeout_s)
    return watcher, pipeline, metrics


def _refusals(m: Metrics, check: str) -> float:
    return m.registry.get_sample_value("sorterd_model_refusals_total", {"check": check}) or 0.0


def _helpers_alive() -> list[str]:
    """Command lines of this process's children that are the helper (none may outlive its step)."""
    kids: list[str] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                continue
            if prepare.MODULE in cmd:
                kids.append(cmd)
    return kids


def test_a_file_tampered_after_activation_is_refused_in_the_helper(store: ReleaseStore, options: InferenceOptions,
                                                                   tmp_path: Path) -> None:
    watcher, pipeline, metrics = _watcher(store, options, tmp_path)
    store.activate(1)
    asyncio.run(watcher.step())
    assert watcher.running == 1 and pipeline.model.current().version.endswith("@r1")
    store.activate(2)
    golden = store.path(2) / "golden_outputs.npy"  # same size, one byte changed: only the hash shows it
    data = bytearray(golden.read_bytes())
    data[-1] ^= 0xFF
    golden.write_bytes(bytes(data))
    asyncio.run(watcher.step())
    assert watcher.running == 1 and pipeline.model.current().version.endswith("@r1")  # nothing swapped
    assert _refusals(metrics, "file-hash") == 1 and 2 in watcher.refused
    assert metrics.registry.get_sample_value("sorterd_model_swaps_total") == 1
    with pytest.raises(Refused, match=r"file-hash: .*golden_outputs\.npy: sha256"):
        prepare.prepare_in_child(store, 2, options, None, 120.0)


def test_the_helper_answers_what_it_verified(store: ReleaseStore, options: InferenceOptions, tmp_path: Path) -> None:
    from sorterd.data.bundle import sha256_file

    kit = save_kit(tmp_path / "kit.npz", faithful_kit())
    got = prepare.prepare_in_child(store, 2, options, KitPolicy(lambda: kit), 120.0)
    assert got.release == 2 and got.manifest_sha256 == sha256_file(store.path(2) / "manifest.json")
    assert got.onnx_sha256 == sha256_file(store.path(2) / "model.onnx") and got.seconds > 0
    with pytest.raises(Refused, match="reference-kit: no recorded reference kit"):
        prepare.prepare_in_child(store, 2, options, KitPolicy(lambda: None), 120.0)
    assert _helpers_alive() == []


def test_a_helper_past_its_timeout_is_killed_tried_again_later_then_refused(
        store: ReleaseStore, options: InferenceOptions, tmp_path: Path) -> None:
    """A timeout says the machine is busy, not that the release is bad: the running model stays,
    the release is tried again once its wait is over (not before), and refused only when the
    schedule gives up."""
    watcher, pipeline, metrics = _watcher(store, options, tmp_path, timeout_s=0.05)  # too short to start python
    now = [0.0]
    watcher.retries = Retries(first_s=60.0, attempts=2, clock=lambda: now[0])
    store.activate(2)
    asyncio.run(watcher.step())
    assert watcher.running is None and "@r" not in pipeline.model.current().version  # the configured bundle runs
    assert _helpers_alive() == []  # killed and reaped, not left running
    assert _refusals(metrics, "prepare-timeout") == 0 and 2 not in watcher.refused and watcher.retries.waiting(2)
    watcher.prepare_timeout_s = 120.0
    asyncio.run(watcher.step())  # its wait is not over: not tried (it would pass now)
    assert watcher.running is None
    watcher.prepare_timeout_s, now[0] = 0.05, 61.0
    asyncio.run(watcher.step())  # tried again, times out again: that was the last try
    assert _refusals(metrics, "prepare-timeout") == 1 and 2 in watcher.refused
    assert watcher.running is None
    watcher.refused.clear()  # as a new activation would
    watcher.prepare_timeout_s = 120.0
    asyncio.run(watcher.step())
    assert watcher.running == 2 and pipeline.model.current().version.endswith("@r2")


@pytest.mark.parametrize(("code", "want"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", r"was killed by SIGKILL without an answer"),
    ("import sys; print('half an answer {', flush=True); sys.exit('MemoryError: out of memory')",
     r"exited with status 1 without an answer \(it said: MemoryError: out of memory\)"),
])
def test_a_helper_that_dies_is_refused_and_the_old_release_runs(
        store: ReleaseStore, options: InferenceOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        code: str, want: str) -> None:
    watcher, pipeline, metrics = _watcher(store, options, tmp_path)
    watcher.retries = Retries(attempts=1)  # no second try: the refusal itself is what this test reads
    store.activate(1)
    asyncio.run(watcher.step())
    monkeypatch.setattr(prepare, "child_command", lambda: [sys.executable, "-c", code])  # the helper dies
    store.activate(2)
    asyncio.run(watcher.step())
    assert watcher.running == 1 and pipeline.model.current().version.endswith("@r1")
    assert _refusals(metrics, "prepare-died") == 1
    with pytest.raises(Refused, match=want):
        prepare.prepare_in_child(store, 2, options, None, 120.0)


def test_the_helper_runs_at_the_lowest_priority_and_refuses_a_bad_request() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = ("import os; from sorterd.release.prepare import lower_priority; got = lower_priority(); "
            "print(os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0) == os.SCHED_IDLE, got)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    nice, idle, got = out.strip().split(" ", 2)
    assert nice == "19" and ("SCHED_IDLE" in got) == (idle == "True")  # what it says it got is what it has
    bad = subprocess.run([sys.executable, "-m", prepare.MODULE], input="[1, 2]", env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("sorterd.release.prepare: bad request on stdin (the request is not a JSON "
                                  "object); it is started by the release watcher and the release download")
    both = subprocess.run([sys.executable, "-m", prepare.MODULE], input='{"release": 2, "stage": "/x"}', env=env,
                          capture_output=True, text=True)
    assert both.returncode == 2 and both.stdout == "" and 'exactly one of "release"' in both.stderr


def test_request_is_plain_json(store: ReleaseStore, options: InferenceOptions, tmp_path: Path) -> None:
    req = prepare.request(store, 2, options, KitPolicy(lambda: tmp_path / "kit.npz", False, 0.95))
    assert json.loads(json.dumps(req)) == req
    assert req["kit"] == str(tmp_path / "kit.npz") and req["require_kit"] is False and req["min_agreement"] == 0.95
    assert req["release"] == 2 and len(req["trusted"]) == 1 and req["use_kit"] is True and "stage" not in req
    staged = prepare.request(store, tmp_path / "3.unpack", options, None)
    assert json.loads(json.dumps(staged)) == staged and staged["stage"] == str(tmp_path / "3.unpack")
    assert "release" not in staged and staged["use_kit"] is False


# -- a download staged in the helper (Downloader.finish's stager) -------------------------------

def _clean(store: ReleaseStore) -> None:
    """Nothing half-staged: staging/ empty, releases/ and the floor as the fixture left them."""
    assert sorted(p.name for p in (store.root / "staging").iterdir()) == []
    assert store.releases() == [1, 2] and store.state().highest_accepted == 2


def test_a_download_is_staged_in_the_helper(store: ReleaseStore, key: Ed25519PrivateKey, options: InferenceOptions,
                                            tmp_path: Path) -> None:
    kit = save_kit(tmp_path / "kit.npz", faithful_kit())
    src = make_release(tmp_path / "3.unpack", key, 3)
    got = prepare.stage_in_child(store, 3, src, options, KitPolicy(lambda: kit), 120.0)
    assert got.release == 3 and got.trainer and got.seconds > 0
    assert got.pid not in (0, os.getpid())  # staged by another process: the helper
    assert store.releases() == [1, 2, 3] and store.state().highest_accepted == 3
    assert store.verify_stored(3).release == 3 and not list((store.root / "staging").iterdir())
    assert _helpers_alive() == []


def test_a_download_failing_a_check_in_the_helper_is_refused_naming_it(
        store: ReleaseStore, key: Ed25519PrivateKey, options: InferenceOptions, tmp_path: Path) -> None:
    kit = save_kit(tmp_path / "kit.npz", faithful_kit())
    src = make_release(tmp_path / "3.unpack", key, 3)
    golden = src / "golden_outputs.npy"
    data = bytearray(golden.read_bytes())
    data[-1] ^= 0xFF
    golden.write_bytes(bytes(data))
    with pytest.raises(Refused, match=r"file-hash: .*golden_outputs\.npy: sha256") as exc:
        prepare.stage_in_child(store, 3, src, options, KitPolicy(lambda: kit), 120.0)
    assert exc.value.check == "file-hash"
    _clean(store)
    with pytest.raises(Refused, match="reference-kit: no recorded reference kit"):  # the kit is judged there too
        prepare.stage_in_child(store, 3, make_release(tmp_path / "3b.unpack", key, 3), options,
                               KitPolicy(lambda: None), 120.0)
    _clean(store)


@pytest.mark.parametrize("step", ["stage.copy", "stage.qa", "stage.rename"])
def test_a_staging_helper_that_dies_leaves_nothing_staged(
        store: ReleaseStore, key: Ed25519PrivateKey, options: InferenceOptions, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Killed with its copy half made, verified but not gated, and renamed into releases/3 but not
    recorded: each is refused prepare-died and undone (`ReleaseStore.undo_stage`)."""
    helper_dies_at(monkeypatch, step)
    src = make_release(tmp_path / "3.unpack", key, 3)
    with pytest.raises(Refused, match=r"prepare-died: release 3: the checking helper was killed by SIGKILL") as exc:
        prepare.stage_in_child(store, 3, src, options, None, 120.0)
    assert "nothing was staged" in exc.value.detail
    _clean(store)
    assert _helpers_alive() == []


def test_a_staging_helper_that_dies_after_recording_it_has_staged_it(
        store: ReleaseStore, key: Ed25519PrivateKey, options: InferenceOptions, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    helper_dies_at(monkeypatch, "state.written")  # state.json says accepted: nothing to undo
    got = prepare.stage_in_child(store, 3, make_release(tmp_path / "3.unpack", key, 3), options, None, 120.0)
    assert got.release == 3 and got.trainer == store.verify_stored(3).trainer
    assert store.releases() == [1, 2, 3] and store.state().highest_accepted == 3


def test_a_staging_helper_past_its_timeout_is_killed_and_nothing_staged(
        store: ReleaseStore, key: Ed25519PrivateKey, options: InferenceOptions, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reached = tmp_path / "reached"
    helper_dies_at(monkeypatch, "stage.qa", reached)  # stuck with its verified copy in staging/
    src = make_release(tmp_path / "3.unpack", key, 3)
    with pytest.raises(Refused, match=r"prepare-timeout: release 3: the checks did not finish within 20 s"):
        prepare.stage_in_child(store, 3, src, options, None, 20.0)
    assert reached.exists()  # killed mid-staging, not before it began
    _clean(store)
    assert _helpers_alive() == []


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_helper_dies_with_the_sorter_that_started_it(tmp_path: Path) -> None:
    """A sorter killed alone (outside systemd's control group) takes its checking helper with it:
    no helper goes on writing the store beside the restarted sorter."""
    pidfile = tmp_path / "helper.pid"
    helper = ("import os, time; from sorterd.release import prepare; prepare.die_with_parent(); "
              f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    sorter = ("import subprocess, sys, time; from sorterd.release import prepare; "
              f"subprocess.Popen([sys.executable, '-c', {helper!r}], env=prepare._child_env()); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", sorter], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None, "the helper never started"
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        os.kill(pid, 0)  # alive while its sorter is
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the helper outlived its sorter"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_retries_wait_twice_as_long_each_time_up_to_the_cap_then_give_up() -> None:
    now = [0.0]
    r = Retries(first_s=60.0, max_s=150.0, attempts=4, clock=lambda: now[0])
    assert not r.waiting(7)
    assert r.failed(7) == (60.0, 1) and r.waiting(7)
    now[0] = 60.0
    assert not r.waiting(7) and r.failed(7) == (120.0, 2)
    assert r.failed(7) == (150.0, 3)  # capped
    assert r.failed(7) is None and not r.waiting(7)  # the 4th failure: give up, forgotten
    assert r.failed(7) == (60.0, 1)
    r.done(7)
    assert not r.waiting(7) and not r.waiting(8)
    with pytest.raises(ValueError, match="need 0 < first_s <= max_s and attempts >= 1"):
        Retries(first_s=10.0, max_s=5.0)
