"""Named crash points: where the power-cut tests SIGKILL the sorter (issue 12 "power cut at every
step of download, staging, verification, engine build and swap"; DESIGN §4a).

`point(name)` does nothing unless the environment says `SORTERD_CRASH_AT=<name>:<k>`; then the
k-th time the process passes point `name` it sends itself SIGKILL -- a power cut at a known,
repeatable instant (no timing, no flakes).  Every point the code has is in `STEPS`, so a test
can cover each one; the variable is read once (the first call).

A power cut takes the whole machine, so a point passed in the sorter's helper process
(`sorterd.release.prepare`: a swap's verification and QA gate, and a download's whole staging,
`stage.*` / `verify.*` / `state.*`, run there) counts as a pass of the sorter's own: the helper is started with `child_env()` (the passes still to go, and
`SORTERD_CRASH_PARENT=1`), reports its passes back in its answer (`passed()` -> `absorb()`), and
when it is the one to reach the k-th pass it SIGKILLs its parent, the sorter, and then itself.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SORTERD_CRASH_AT"
PARENT_ENV = "SORTERD_CRASH_PARENT"  # "1": a helper process -- a crash here kills the sorter too

STEPS = (
    "download.chunk",   # link: a chunk appended to staging/<N>.part, before it is fsynced
    "download.complete",  # link: the whole stream is in staging/<N>.part, not yet unpacked
    "download.unpacked",  # link: split into staging/<N>.unpack/ (fsynced), not yet staged
    "stage.copy",       # a file of the bundle copied into staging/, before the next one
    "stage.verify",     # the whole copy is in staging/, verification not begun
    "verify.signature", # the signature checked, the files not yet hashed
    "verify.hashes",    # every file hashed, the ONNX not yet loaded
    "stage.qa",         # verified, the QA gate not yet run
    "stage.rename",     # renamed into releases/<N>, the directory not yet fsynced, state not written
    "state.write",      # about to write state.json (accepted, activated, rolled back, pinned)
    "state.written",    # state.json renamed into place, its directory not yet fsynced
    "swap.prepared",    # the helper verified and QA-checked the release, the daemon has not opened it
    "swap.opened",      # the release opened in the daemon, not yet live
    "swap.swapped",     # live in the pipeline, the watcher's bookkeeping not yet done
    # The TensorRT engine of a release opened with [inference] type = "tensorrt" (its inference thread:
    # start-up, the watcher's open, a `sorterd models stage` QA gate); sorterd/parts/inference/.
    "engine.built",     # tensorrt: the engine serialized in memory, nothing of it written to the cache
    "engine.writing",   # engine_cache.store: the engine whole and fsynced in its temporary file, not renamed
    "engine.written",   # engine_cache.store: the engine renamed into place, its sidecar not yet written
    "engine.stored",    # tensorrt: engine and sidecar in the cache, the engine not yet loaded nor live
)

_want: tuple[str, int] | None | bool = False  # False: not read yet
_passed: Counter[str] = Counter()


def _spec() -> tuple[str, int] | None:
    global _want
    if _want is False:
        raw = os.environ.get(ENV, "")
        if not raw:
            _want = None
        else:
            name, _, k = raw.rpartition(":")
            if name not in STEPS or not k.isdigit() or int(k) < 1:
                raise ValueError(f"{ENV}={raw!r}: expected <step>:<k>, k >= 1, step one of {', '.join(STEPS)}")
            _want = (name, int(k))
    return _want  # type: ignore[return-value]


def point(name: str) -> None:
    """Crash point `name` (one of `STEPS`): SIGKILL here on its k-th pass when asked to."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return
    _passed[name] += 1
    if _passed[name] == spec[1]:
        if os.environ.get(PARENT_ENV) == "1":
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a helper process: the crash point, if any, with the passes this process already
    made taken off (a helper dies on the sorter's k-th pass, not its own); none when it is past."""
    env = {k: v for k, v in env.items() if k not in (ENV, PARENT_ENV)}
    spec = _spec()
    if spec is not None and spec[1] > _passed[spec[0]]:
        env[ENV], env[PARENT_ENV] = f"{spec[0]}:{spec[1] - _passed[spec[0]]}", "1"
    return env


def passed() -> dict[str, int]:
    """The passes this process made (a helper's answer carries them back)."""
    return dict(_passed)


def absorb(passes: object) -> None:
    """Count a helper's passes as this process's own (`passes` as its answer had them)."""
    if isinstance(passes, dict):
        for name, n in passes.items():
            if name in STEPS and isinstance(n, int) and n > 0:
                _passed[name] += n
