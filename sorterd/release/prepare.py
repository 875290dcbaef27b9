"""A release checked -- or a download staged -- in a helper process, so that the sorter's own
process never does that CPU work (DESIGN §4a "swap between two frame pairs"; issue 12 item 5: a
swap must not delay stones; "nothing a download does may delay a stone").

The checks a release must pass -- verification (signature, every file's size and sha256, the
ONNX's inputs/outputs) and the QA gate (golden inputs and the reference kit, §8.4 item 6: ~64
stones through the model) -- are CPU work in numpy and onnxruntime.  Run in the sorter's own
process they take the GIL and the cores from the pipeline's workers, whatever the thread's nice
value (bench/RESULTS.md "Release swap": p99 x1.69 in the swap window).  So both places that run
them in a running sorter have them run here, in a child process::

    python -m sorterd.release.prepare  < request.json  > answer.json

* two kinds of request, one protocol: `{"release": N, ...}` -- the release watcher's checks of a
  newly active stored release (`prepare_in_child`: `swap.check_release`, read-only); and
  `{"stage": "<dir>", ...}` -- a download over the link, unpacked into `<dir>` by
  `sorterd.release.download`, staged (`stage_in_child`, `ChildStager`: `ReleaseStore.stage` with
  `swap.qa_gate`: copied into staging/, verified with the downgrade floor, QA-gated, renamed into
  releases/<N>, recorded in state.json).  The same code `sorterd models stage` runs in-process (a
  CLI, no stones) -- only where it runs differs.
* The child lowers its own priority first, before it imports numpy or onnxruntime:
  nice 19 and `SCHED_IDLE` where Linux allows it (an unprivileged process may), so it only gets
  CPU time the sorter leaves; onnxruntime runs with one intra-op thread and the sorter's
  providers (a TensorRT sorter's checks run its onnxruntime fallback: the engine is built and
  parity-checked by the backend itself, `sorterd.parts.inference.tensorrt`).
* The request is one JSON object on stdin (`request()`): the job ("release" or "stage"), the
  store directory, the trusted public keys (raw Ed25519, base64), the size limit, the kit file
  (or null), `use_kit`, `require_kit`, `min_agreement`, the providers.  The answer is one JSON line
  on stdout: `{"ok": true, "release": N, "trainer": ..., "manifest_sha256": ..., "onnx_sha256":
  ..., "seconds": ..., "pid": ...}` or `{"ok": false, "check": <a verify.CHECKS / QA_CHECKS name>,
  "detail": ...}`, or `{"ok": false, "store": <a StoreError's text>}`; each carries `crash_passes`
  (`sorterd.release.crash`: a crash point the child passes -- `stage.*`, `verify.*`, `state.*` --
  counts as the sorter's, and the child's SIGKILL takes the sorter with it, as a power cut would).
  Nothing read from disk is unpickled, by either side.

The parent (`_ask`, blocking: the watcher's thread, or the link client's for a download) gives
the child `[models] prepare_timeout_s`; past it the child is killed and the release refused as
`prepare-timeout`; a child that dies (a signal, an exit without an answer) or answers nonsense is
refused as `prepare-died`.  The watcher then swaps nothing and the running release keeps running;
a download's staging is settled (`ReleaseStore.undo_stage`: nothing half-staged stays) and the
refusal reported to the trainer.  What the helper checked for a swap is then opened in the sorter
(`swap.open_prepared`): the onnxruntime session only, after manifest.json's bytes are matched
against the hash the child verified (a release directory is written once; this catches one
changed behind the check).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorterd.release import crash

if TYPE_CHECKING:
    from sorterd.parts.inference import InferenceOptions
    from sorterd.release.qa import KitPolicy
    from sorterd.release.store import ReleaseStore

log = logging.getLogger(__name__)

PREPARE_CHECKS = ("prepare-timeout", "prepare-died")  # refusals of the helper itself (metric labels)
MODULE = "sorterd.release.prepare"
PARENT_ENV = "SORTERD_PREPARE_PARENT"  # the sorter's pid, for `die_with_parent`


class Retries:
    """When to try a release's helper work again after it failed for this machine's sake
    (`PREPARE_CHECKS`, or a store error): not before `first_s`, then twice as long each time up to
    `max_s`; after `attempts` failures `failed` says to give up.  Used from one thread at a time."""

    def __init__(self, first_s: float = 60.0, max_s: float = 900.0, attempts: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < first_s <= max_s or attempts < 1:
            raise ValueError(f"Retries(first_s={first_s!r}, max_s={max_s!r}, attempts={attempts!r}): need "
                             "0 < first_s <= max_s and attempts >= 1")
        self.first_s, self.max_s, self.attempts, self.clock = first_s, max_s, attempts, clock
        self._due: dict[int, tuple[float, int]] = {}  # release -> (not before, clock s; failures so far)

    def waiting(self, release: int) -> bool:
        """True while `release`'s next try is not yet due."""
        due = self._due.get(release)
        return due is not None and self.clock() < due[0]

    def failed(self, release: int) -> tuple[float, int] | None:
        """One more failure: (seconds until the next try, failures so far), or None when that was
        the last allowed (the release is forgotten: refuse it)."""
        tries = self._due.get(release, (0.0, 0))[1] + 1
        if tries >= self.attempts:
            self._due.pop(release, None)
            return None
        wait = min(self.max_s, self.first_s * 2 ** (tries - 1))
        self._due[release] = (self.clock() + wait, tries)
        return wait, tries

    def done(self, release: int) -> None:
        self._due.pop(release, None)


@dataclass(frozen=True)
class Prepared:
    """What the helper verified: the release, manifest.json's and model.onnx's sha256, its seconds,
    the helper's pid."""

    release: int
    manifest_sha256: str
    onnx_sha256: str
    seconds: float
    pid: int


@dataclass(frozen=True)
class Staged:
    """A download the helper staged into releases/<release>: who signed it, its seconds, the helper's
    pid (0 and 0.0: the helper ended without an answer after recording the release as accepted)."""

    release: int
    trainer: str
    seconds: float
    pid: int


def request(store: ReleaseStore, what: int | Path, options: InferenceOptions, kit: KitPolicy | None) -> dict[str, Any]:
    """The child's request for `what`: a stored release's number (its checks) or a downloaded
    release's unpacked directory (staged into the store).  Blocking: the kit's newest file is looked up."""
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    kit_path = None if kit is None else kit.find()
    job = {"stage": str(what)} if isinstance(what, Path) else {"release": what}
    return {**job, "store": str(store.root), "max_bytes": store.max_bytes,
            "trusted": [base64.b64encode(k.public_bytes(*raw)).decode() for k in store.trusted],
            "providers": list(options.providers), "kit": None if kit_path is None else str(kit_path),
            "use_kit": kit is not None, "require_kit": True if kit is None else kit.require,
            "min_agreement": 0.90 if kit is None else kit.min_agreement}


def child_command() -> list[str]:
    """The helper's command line (this interpreter, this package)."""
    return [sys.executable, "-m", MODULE]


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the sorterd package
    env = crash.child_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread each: background work
        env[var] = "1"
    env[PARENT_ENV] = str(os.getpid())
    return env


def _ask(req: dict[str, Any], timeout_s: float, what: str, retry: str) -> dict[str, Any]:
    """The helper's answer to `req` when it is ok; raises `Refused` (the failed check, or
    `prepare-timeout` / `prepare-died`: `what` names the work, `retry` how to try again) or
    `StoreError`.  Blocking; the helper's crash-point passes count as this process's."""
    from sorterd.release.store import StoreError
    from sorterd.release.verify import Refused

    try:
        done = subprocess.run(child_command(), input=json.dumps(req), capture_output=True, text=True,
                              timeout=timeout_s, env=_child_env(), check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped it
        raise Refused("prepare-timeout", f"{what}: the checks did not finish within {timeout_s:g} s "
                      "([models] prepare_timeout_s; the helper runs at the lowest priority: is the CPU saturated?); "
                      f"{retry}") from None
    answer = _answer(done.stdout, "stage" in req)
    if answer is None:
        raise Refused("prepare-died", f"{what}: the checking helper {_how(done.returncode)} without an "
                      f"answer{_last_line(done.stderr)}; {retry}")
    crash.absorb(answer.get("crash_passes"))
    if answer["ok"] is True:
        return answer
    if isinstance(answer.get("store"), str):
        raise StoreError(answer["store"])
    raise Refused(str(answer.get("check", "prepare-died")), str(answer.get("detail", "no detail")))


def prepare_in_child(store: ReleaseStore, release: int, options: InferenceOptions, kit: KitPolicy | None,
                     timeout_s: float) -> Prepared:
    """Run the checks of stored release `release` in a helper process; raises `Refused` (the
    failed check, or `prepare-timeout` / `prepare-died`) or `StoreError`.  Blocking."""
    a = _ask(request(store, release, options, kit), timeout_s, f"release {release}", "activate it again to retry")
    return Prepared(release, str(a["manifest_sha256"]), str(a["onnx_sha256"]), float(a["seconds"]), int(a["pid"]))


def stage_in_child(store: ReleaseStore, release: int, unpacked: Path, options: InferenceOptions,
                   kit: KitPolicy | None, timeout_s: float) -> Staged:
    """`ReleaseStore.stage(unpacked, qa_gate(options, kit))` in a helper process: the download of
    offered release `release` (its number names it in messages) copied into staging, verified,
    QA-gated and moved into releases/<N> there; raises `Refused` (the failed check, or
    `prepare-timeout` / `prepare-died`) or `StoreError`.  Blocking.  What a helper that died or was
    killed left is settled here (`ReleaseStore.undo_stage`): nothing half-staged stays, and one that
    died after recording the release as accepted has staged it."""
    from sorterd.release.verify import Refused

    before = store.floor().highest
    try:
        a = _ask({**request(store, unpacked, options, kit), "expect_release": release}, timeout_s,
                 f"release {release}", "nothing was staged")
    except Refused as exc:
        if exc.check not in PREPARE_CHECKS:
            raise
        recorded = store.undo_stage(unpacked, before)
        if recorded is None:
            raise
        log.warning("release %d: the staging helper ended without an answer after recording it as accepted "
                    "(%s): it is staged", recorded[0], exc.detail)
        return Staged(recorded[0], recorded[1], 0.0, 0)
    return Staged(int(a["release"]), str(a["trainer"]), float(a["seconds"]), int(a["pid"]))


class ChildStager:
    """The download's `Stager` (`sorterd.release.download`): each downloaded release staged by
    `stage_in_child` with the sorter's providers, kit policy and `[models] prepare_timeout_s`."""

    def __init__(self, store: ReleaseStore, options: InferenceOptions, kit: KitPolicy | None,
                 timeout_s: float) -> None:
        self.store, self.options, self.kit, self.timeout_s = store, options, kit, timeout_s

    def stage(self, release: int, unpacked: Path) -> Staged:
        return stage_in_child(self.store, release, unpacked, self.options, self.kit, self.timeout_s)


def _answer(stdout: str, staged: bool) -> dict[str, Any] | None:
    """The last stdout line as the helper's answer object, or None when it is not one (`staged`:
    an answer to a stage request, which names the release and its trainer)."""
    lines = stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        return None
    if answer["ok"]:
        want: tuple[tuple[str, type | tuple[type, ...]], ...] = (
            ("manifest_sha256", str), ("onnx_sha256", str), ("seconds", (int, float)), ("pid", int))
        if staged:
            want += (("release", int), ("trainer", str))
        if not all(isinstance(answer.get(k), t) for k, t in want):
            return None
    return answer


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f" (it said: {lines[-1].strip()[:300]})" if lines else ""


# ---------------------------------------------------------------------------------- the child
def lower_priority() -> str:
    """This process to the background: SCHED_IDLE if allowed, and nice 19; what it got."""
    got = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        got.append("nice 19")
    except (AttributeError, OSError):
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        got.append("SCHED_IDLE")
    except (AttributeError, OSError):
        pass
    return ", ".join(got) or "normal priority (not allowed to lower it)"


def serve(req: dict[str, Any]) -> dict[str, Any]:
    """What a request asks for -- a stored release's checks, or a download staged -- as the answer
    object (in the child; imports the heavy parts)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sorterd.data.bundle import sha256_file
    from sorterd.parts.inference.onnxruntime import OnnxInferenceConfig
    from sorterd.release.qa import KitPolicy
    from sorterd.release.sign import MANIFEST
    from sorterd.release.store import ReleaseStore, StoreError
    from sorterd.release.swap import check_release, qa_gate
    from sorterd.release.verify import Refused

    t0 = time.perf_counter()
    trusted = [Ed25519PublicKey.from_public_bytes(base64.b64decode(k)) for k in req["trusted"]]
    store = ReleaseStore(Path(req["store"]), trusted, int(req["max_bytes"]))
    options = OnnxInferenceConfig(threads=1, providers=tuple(req["providers"]))
    kit_file = None if req["kit"] is None else Path(req["kit"])
    kit = (KitPolicy(lambda: kit_file, bool(req["require_kit"]), float(req["min_agreement"]))
           if req["use_kit"] else None)
    try:
        if "stage" in req:
            expect = req.get("expect_release")
            v = store.stage(Path(req["stage"]), qa_gate(options, kit), None if expect is None else int(expect))
        else:
            v = check_release(store, int(req["release"]), options, kit)
    except Refused as exc:
        return {"ok": False, "check": exc.check, "detail": exc.detail}
    except StoreError as exc:
        return {"ok": False, "store": str(exc)}
    return {"ok": True, "release": v.release, "trainer": v.trainer, "manifest_sha256": sha256_file(v.path / MANIFEST),
            "onnx_sha256": v.onnx_sha256, "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()}


def _job_problem(req: object) -> str:
    """Why `req` is not a request ('' = it is one)."""
    if not isinstance(req, dict):
        return "the request is not a JSON object"
    if ("release" in req) == ("stage" in req):
        return 'a request asks for exactly one of "release" (a stored release\'s checks) and "stage" (a download)'
    return ""


def die_with_parent() -> None:
    """Linux: this helper is killed when the sorter that started it dies (PR_SET_PDEATHSIG), so a
    helper never goes on writing the store beside a restarted sorter (a sorter killed alone, outside
    systemd's control group).  Elsewhere, or if the parent is already gone, nothing / exit."""
    parent = os.environ.get(PARENT_ENV)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if parent is not None and str(os.getppid()) != parent:  # it died before the prctl took hold
        os._exit(3)


def main() -> int:
    die_with_parent()
    lower_priority()  # before numpy and onnxruntime are imported: their start-up is background work too
    try:
        req = json.loads(sys.stdin.read())
        problem = _job_problem(req)
        if problem:
            raise ValueError(problem)
    except ValueError as exc:
        print(f"{MODULE}: bad request on stdin ({exc}); it is started by the release watcher and the "
              "release download", file=sys.stderr)
        return 2
    answer = serve(req)
    print(json.dumps({**answer, "crash_passes": crash.passed()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
