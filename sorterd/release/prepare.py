"""A release checked in a helper process before the sorter swaps it in (DESIGN §4a "swap between
two frame pairs"; issue 12 item 5: a swap must not delay stones).

The checks a newly active release must pass -- `ReleaseStore.verify_stored` (signature, every
file's size and sha256, the ONNX's inputs/outputs) and the QA gate (golden inputs and the
reference kit, §8.4 item 6: ~64 stones through the model) -- are CPU work in numpy and
onnxruntime.  Run in the sorter's own process they take the GIL and the cores from the pipeline's
workers, whatever the thread's nice value (bench/RESULTS.md "Release swap": p99 x1.69 in the swap
window).  So the release watcher runs them here, in a child process::

    python -m sorterd.release.prepare  < request.json  > answer.json

* The child lowers its own priority first, before it imports numpy or onnxruntime:
  nice 19 and `SCHED_IDLE` where Linux allows it (an unprivileged process may), so it only gets
  CPU time the sorter leaves; onnxruntime runs with one intra-op thread and the sorter's
  providers (a TensorRT sorter's checks run its onnxruntime fallback: the engine is built and
  parity-checked by the backend itself, `sorterd.parts.inference.tensorrt`).
* The request is one JSON object on stdin (`request()`): the store directory, the trusted
  public keys (raw Ed25519, base64), the size limit, the release number, the kit file (or null),
  `require_kit`, `min_agreement`, the providers.  The answer is one JSON line on stdout:
  `{"ok": true, "manifest_sha256": ..., "onnx_sha256": ..., "seconds": ...}` or
  `{"ok": false, "check": <a verify.CHECKS / QA_CHECKS name>, "detail": ...}`, or
  `{"ok": false, "store": <a StoreError's text>}`; both carry `crash_passes`
  (`sorterd.release.crash`).  Nothing read from disk is unpickled, by either side.
* The checks themselves are `sorterd.release.swap.check_release`: the same code that
  `sorterd models stage` runs in-process (a CLI, no stones) -- only where it runs differs.

The parent (`prepare_in_child`, blocking: the watcher's thread) gives the child
`[models] prepare_timeout_s`; past it the child is killed and the release refused as
`prepare-timeout`; a child that dies (a signal, an exit without an answer) or answers nonsense is
refused as `prepare-died`.  Either way nothing is swapped and the running release keeps running.
What the helper checked is then opened in the sorter (`swap.open_prepared`): the onnxruntime
session only, after manifest.json's bytes are matched against the hash the child verified (a
release directory is written once; this catches one changed behind the check).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sorterd.release import crash

if TYPE_CHECKING:
    from sorterd.parts.inference import InferenceOptions
    from sorterd.release.qa import KitPolicy
    from sorterd.release.store import ReleaseStore

PREPARE_CHECKS = ("prepare-timeout", "prepare-died")  # refusals of the helper itself (metric labels)
MODULE = "sorterd.release.prepare"


@dataclass(frozen=True)
class Prepared:
    """What the helper verified: the release, manifest.json's and model.onnx's sha256, its seconds."""

    release: int
    manifest_sha256: str
    onnx_sha256: str
    seconds: float


def request(store: ReleaseStore, release: int, options: InferenceOptions, kit: KitPolicy | None) -> dict[str, Any]:
    """The child's request (blocking: the kit's newest file is looked up)."""
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    kit_path = None if kit is None else kit.find()
    return {"store": str(store.root), "max_bytes": store.max_bytes, "release": release,
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
    return env


def prepare_in_child(store: ReleaseStore, release: int, options: InferenceOptions, kit: KitPolicy | None,
                     timeout_s: float) -> Prepared:
    """Run the checks of stored release `release` in a helper process; raises `Refused` (the
    failed check, or `prepare-timeout` / `prepare-died`) or `StoreError`.  Blocking."""
    from sorterd.release.store import StoreError
    from sorterd.release.verify import Refused

    body = json.dumps(request(store, release, options, kit))
    try:
        done = subprocess.run(child_command(), input=body, capture_output=True, text=True, timeout=timeout_s,
                              env=_child_env(), check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped it
        raise Refused("prepare-timeout", f"release {release}: the checks did not finish within {timeout_s:g} s "
                      "([models] prepare_timeout_s; the helper runs at the lowest priority: is the CPU saturated?); "
                      "activate it again to retry") from None
    answer = _answer(done.stdout)
    if answer is None:
        raise Refused("prepare-died", f"release {release}: the checking helper {_how(done.returncode)} without an "
                      f"answer{_last_line(done.stderr)}; activate it again to retry")
    crash.absorb(answer.get("crash_passes"))
    if answer.get("ok") is True:
        return Prepared(release, str(answer["manifest_sha256"]), str(answer["onnx_sha256"]), float(answer["seconds"]))
    if isinstance(answer.get("store"), str):
        raise StoreError(answer["store"])
    raise Refused(str(answer.get("check", "prepare-died")), str(answer.get("detail", "no detail")))


def _answer(stdout: str) -> dict[str, Any] | None:
    """The last stdout line as the helper's answer object, or None when it is not one."""
    lines = stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    ok = isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
    if ok and answer["ok"]:  # type: ignore[index]
        ok = all(isinstance(answer.get(k), t) for k, t in  # type: ignore[union-attr]
                 (("manifest_sha256", str), ("onnx_sha256", str), ("seconds", (int, float))))
    return answer if ok else None  # type: ignore[return-value]


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
    """The checks a request asks for, as the answer object (in the child; imports the heavy parts)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sorterd.data.bundle import sha256_file
    from sorterd.parts.inference.onnxruntime import OnnxInferenceConfig
    from sorterd.release.qa import KitPolicy
    from sorterd.release.sign import MANIFEST
    from sorterd.release.store import ReleaseStore, StoreError
    from sorterd.release.swap import check_release
    from sorterd.release.verify import Refused

    t0 = time.perf_counter()
    trusted = [Ed25519PublicKey.from_public_bytes(base64.b64decode(k)) for k in req["trusted"]]
    store = ReleaseStore(Path(req["store"]), trusted, int(req["max_bytes"]))
    options = OnnxInferenceConfig(threads=1, providers=tuple(req["providers"]))
    kit_file = None if req["kit"] is None else Path(req["kit"])
    kit = (KitPolicy(lambda: kit_file, bool(req["require_kit"]), float(req["min_agreement"]))
           if req["use_kit"] else None)
    try:
        v = check_release(store, int(req["release"]), options, kit)
    except Refused as exc:
        return {"ok": False, "check": exc.check, "detail": exc.detail}
    except StoreError as exc:
        return {"ok": False, "store": str(exc)}
    return {"ok": True, "manifest_sha256": sha256_file(v.path / MANIFEST), "onnx_sha256": v.onnx_sha256,
            "seconds": round(time.perf_counter() - t0, 3)}


def main() -> int:
    lower_priority()  # before numpy and onnxruntime are imported: their start-up is background work too
    try:
        req = json.loads(sys.stdin.read())
        if not isinstance(req, dict):
            raise ValueError("the request is not a JSON object")
    except ValueError as exc:
        print(f"{MODULE}: bad request on stdin ({exc}); it is started by the release watcher", file=sys.stderr)
        return 2
    answer = serve(req)
    print(json.dumps({**answer, "crash_passes": crash.passed()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
