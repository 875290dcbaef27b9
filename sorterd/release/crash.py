"""Named crash points: where the power-cut tests SIGKILL the sorter (issue 12 "power cut at every
step of download, staging, verification, engine build and swap"; DESIGN §4a).

`point(name)` does nothing unless the environment says `SORTERD_CRASH_AT=<name>:<k>`; then the
k-th time the process passes point `name` it sends itself SIGKILL -- a power cut at a known,
repeatable instant (no timing, no flakes).  Every point the code has is in `STEPS`, so a test
can cover each one; the variable is read once (the first call).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SORTERD_CRASH_AT"

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
    "swap.opened",      # the release opened and QA-checked in the daemon, not yet live
    "swap.swapped",     # live in the pipeline, the watcher's bookkeeping not yet done
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
        os.kill(os.getpid(), signal.SIGKILL)
