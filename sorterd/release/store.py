"""The sorter's release store, `[models] dir` (DESIGN §4a; RAUC/Mender's slots, TUF's rollback floor)::

    <dir>/staging/<n>.<pid>/   a download or copy in progress (removed at start-up: never loaded)
    <dir>/releases/<N>/        releases that passed verification and the QA gate (written once)
    <dir>/state.json           {"active": N|null, "previous": N|null, "highest_accepted": N,
                                "pinned": N|null, "history": [...]}

Every transition is one atomic rename -- a staged directory into releases/<N> (files and
directories fsynced first), or state.json (`write_json_atomic`) -- so a power cut at any
instant leaves the old state or the new one: the sorter runs the old release or the new one,
never a mix, never none.  `highest_accepted` only grows (a restart does not reopen
downgrades); `pin` lets an operator allow exactly one older release.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sorterd.data.files import copy_synced, fsync_dir, write_json_atomic
from sorterd.release import crash
from sorterd.release.verify import Refused, ReleaseFloor, Verified, verify_release

STATE = "state.json"
PART_SUFFIX = ".part"  # staging/<N>.part: a download over the link in progress (sorterd.link)
# A QA gate: the staged release in, its failures as (check, detail) out (empty: passed).
QaGate = Callable[[Verified], list[tuple[str, str]]]


class StoreError(ValueError):
    """An operator's request the store cannot do (unknown release, nothing to roll back to)."""


@dataclass(frozen=True)
class StoreState:
    active: int | None = None
    previous: int | None = None
    highest_accepted: int = 0
    pinned: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the last events: swaps, rollbacks, pins



def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class ReleaseStore:
    """One sorter's `<dir>`; every method is blocking file work (call it from a thread, not the loop)."""

    HISTORY = 50

    def __init__(self, root: Path, trusted: list[Ed25519PublicKey], max_bytes: int) -> None:
        self.root, self.trusted, self.max_bytes = root, trusted, max_bytes
        for d in (root, root / "releases", root / "staging"):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state
    def state(self) -> StoreState:
        path = self.root / STATE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return StoreState()
        except (OSError, json.JSONDecodeError) as exc:  # atomic writes make this a damaged disk, not a torn write
            raise StoreError(f"{path}: cannot read the release state ({exc}); restore it or remove it") from None
        return StoreState(**{k: raw[k] for k in StoreState.__dataclass_fields__ if k in raw})

    def _write(self, state: StoreState, event: dict[str, Any]) -> StoreState:
        state = replace(state, history=[*state.history, {"at": _now(), **event}][-self.HISTORY:])
        crash.point("state.write")
        write_json_atomic(self.root / STATE, asdict(state))
        crash.point("state.written")
        fsync_dir(self.root)
        return state

    def floor(self) -> ReleaseFloor:
        s = self.state()
        return ReleaseFloor(s.highest_accepted, s.pinned)

    def path(self, release: int) -> Path:
        return self.root / "releases" / str(release)

    def releases(self) -> list[int]:
        return sorted(int(p.name) for p in (self.root / "releases").iterdir() if p.name.isdigit())

    # ------------------------------------------------------------------ staging
    def clean_staging(self) -> list[str]:
        """Remove what a power cut left in staging/ and a state.json write's temporary file
        (start-up); the names removed.  A download's `<N>.part` (`PART_SUFFIX`) and the offer it is of,
        `<N>.part.json` (`sorterd.release.download`), are kept: it resumes."""
        left = sorted(p.name for p in (self.root / "staging").iterdir()
                      if not p.name.endswith((PART_SUFFIX, PART_SUFFIX + ".json")))
        for name in left:
            path = self.root / "staging" / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for tmp in sorted(self.root.glob(f".{STATE}.*.tmp")):  # write_json_atomic's, cut before its rename
            tmp.unlink(missing_ok=True)
            left.append(tmp.name)
        # A cut between a release's rename into releases/<N> and the state write that records it:
        # it passed every check before the rename, so it counts as accepted (the floor never lags).
        state, stored = self.state(), max(self.releases(), default=0)
        if stored > state.highest_accepted:
            self._write(replace(state, highest_accepted=stored), {"event": "accepted", "release": stored,
                                                                  "why": "found whole in releases/ at start-up"})
            left.append(f"releases/{stored} (recorded as accepted)")
        return left

    def stage(self, src: Path, qa: QaGate | None, expect_release: int | None = None) -> Verified:
        """Copy `src` into staging, verify it there (the downgrade floor applies), run the QA gate,
        and move it into releases/<N>; raises `Refused` (staging removed, nothing accepted).
        `expect_release`: the number the bundle was offered as (a download); a signed manifest
        naming another is refused `manifest`."""
        tmp = self.root / "staging" / f"{src.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._copy(src, tmp)
            crash.point("stage.verify")
            verified = verify_release(tmp, self.trusted, self.floor(), self.max_bytes)
            if expect_release is not None and verified.release != expect_release:
                raise Refused("manifest", f"the signed manifest is release {verified.release}, but it was offered as "
                              f"release {expect_release}: the trainer's shelf names it wrongly; nothing staged")
            crash.point("stage.qa")
            problems = qa(verified) if qa is not None else []
            if problems:
                check, _ = problems[0]
                raise Refused(check, "; ".join(detail for _, detail in problems))
            final = self.path(verified.release)
            if final.exists():  # accepted before (then pinned): the stored copy is the same signed release
                shutil.rmtree(final)
            os.replace(tmp, final)
            crash.point("stage.rename")
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        state = self.state()
        self._write(replace(state, highest_accepted=max(state.highest_accepted, verified.release),
                            pinned=None if verified.release == state.pinned else state.pinned),
                    {"event": "accepted", "release": verified.release, "trainer": verified.trainer})
        return replace(verified, path=final)

    def undo_stage(self, src: Path, highest_before: int) -> tuple[int, str] | None:
        """Settle what a `stage(src, ...)` in a process that died or was killed without an answer
        left (the download's helper, `sorterd.release.prepare`), as a restart would but without
        counting an unrecorded release as accepted: its copy in staging/ removed; a release it moved
        into releases/ but never recorded (above `highest_accepted`: only a stage cut between its
        rename and its state write leaves one) taken out again, renamed back into staging/ first so
        no cut leaves half of it in releases/.  When it did record a release as accepted after
        `highest_before` (it died after its last step), nothing is undone: (that release, its trainer)."""
        staging = self.root / "staging"
        for p in sorted(staging.glob(f"{src.name}.*")):
            shutil.rmtree(p, ignore_errors=True)
        state = self.state()
        if state.highest_accepted > highest_before:
            n = state.highest_accepted
            trainer = next((str(e.get("trainer", "")) for e in reversed(state.history)
                            if e.get("event") == "accepted" and e.get("release") == n), "")
            return n, trainer
        for n in self.releases():
            if n > state.highest_accepted:
                out = staging / f"{n}.unrecorded"
                shutil.rmtree(out, ignore_errors=True)
                os.replace(self.path(n), out)
                fsync_dir(self.path(n).parent)
                shutil.rmtree(out, ignore_errors=True)
        return None

    def _copy(self, src: Path, dst: Path) -> None:
        """A copy of a flat bundle, every file and the directory fsynced; symlinks are copied as
        symlinks (so verification refuses them) and sub-directories are copied empty."""
        dst.mkdir(parents=True)
        for p in sorted(src.iterdir()):
            if p.is_symlink():
                os.symlink(os.readlink(p), dst / p.name)
            elif p.is_dir():
                (dst / p.name).mkdir()
            else:
                copy_synced(p, dst / p.name)
            crash.point("stage.copy")
        fsync_dir(dst)

    # ------------------------------------------------------------------ going live
    def verify_stored(self, release: int) -> Verified:
        """Re-verify a stored release (start-up, activate, rollback): every check but the floor."""
        if release not in self.releases():
            raise StoreError(f"release {release}: not in {self.root / 'releases'} (stored: {self.releases()})")
        return verify_release(self.path(release), self.trusted, None, self.max_bytes)

    def activate(self, release: int, why: str = "operator") -> StoreState:
        """Make `release` the active one (the previous active becomes `previous`)."""
        self.verify_stored(release)
        s = self.state()
        if s.active == release:
            return s
        return self._write(replace(s, active=release, previous=s.active),
                           {"event": "activated", "release": release, "previous": s.active, "why": why})

    def rollback(self, why: str = "operator", of: int | None = None) -> StoreState:
        """Back to `previous` (the two swap places).  With `of` (the health watch's), only while
        release `of` is still the active one: an operator may have activated another since."""
        s = self.state()
        if of is not None and s.active != of:
            raise StoreError(f"release {of} is no longer the active release (release {s.active} is): "
                             "not rolled back")
        if s.previous is None:
            raise StoreError("nothing to roll back to: no previous release (sorterd models list)")
        self.verify_stored(s.previous)
        return self._write(replace(s, active=s.previous, previous=s.active),
                           {"event": "rolled back", "release": s.previous, "from": s.active, "why": why})

    def pin(self, release: int) -> StoreState:
        """Allow exactly `release` through the downgrade check once (an operator going back on purpose)."""
        if release < 1:
            raise StoreError(f"release {release}: releases are whole numbers >= 1")
        s = self.state()
        return self._write(replace(s, pinned=release), {"event": "pinned", "release": release})
