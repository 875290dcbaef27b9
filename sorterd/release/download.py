"""A signed release downloaded over the link into the sorter's store (issue 12 item 3; DESIGN §4a
"offered → downloaded → verified into staging → reported"; the wire side: `sorterd/link/PROTOCOL.md`).

`Downloader` is the link client's `ReleaseSide`; every method but `running`/`results` is blocking
file work the client runs in a thread, so neither the link task nor a stone ever waits on a disk.

On disk, in `<models.dir>/staging/` (`ReleaseStore.clean_staging` keeps these two at start-up)::

    <N>.part        the release's byte stream so far: the offer's files back to back, in order;
                    each chunk appended and fsynced before the next is asked for
    <N>.part.json   the offer it is a download of (written atomically before the first byte):
                    a restart resumes from the .part's size only when the new offer is the same
                    (release, manifest_sha256, total_bytes, files); otherwise both are discarded

and `<models.dir>/reports.json`: the results not yet on the trainer's disk (`ResultQueue`).

Taking an offer (`offered`), in order: a release this store already holds is answered
"accepted" again (a result lost in a power cut is re-sent); below the downgrade floor (unless
pinned) → refused `downgrade`, nothing downloaded; refused before in this run → ignored;
`total_bytes` over `[models] max_release_mb` → refused `oversized`, nothing downloaded.  A
whole download (`finish`) is split into `staging/<N>.unpack/` by the offer's file list (plain
names only: the wire parser refuses anything else; nothing is ever extracted from an archive;
plain file copying, in this thread), then the `Stager` stages it: in the daemon,
`prepare.ChildStager`, which has the release watcher's helper *process* (`sorterd.release.prepare`,
nice 19 + SCHED_IDLE, one onnxruntime thread) run `ReleaseStore.stage` with the QA gate -- the one
verification (`verify_release`: signature, floor, every file's size and hash, no file unlisted),
golden and the reference kit, the checks `sorterd models stage` runs -- so none of that CPU work
takes the pipeline workers' GIL or cores ("nothing a download does may delay a stone").  The
refusal's `Refused.check` names the failed check.  Accepted + `[models] auto_activate` → the
store's active release, which the daemon's `ReleaseWatcher` swaps in.

A helper past `[models] prepare_timeout_s` (killed), one that dies without an answer, or a store
error (a full disk) says nothing about the release, only about this machine now: what the helper
left is settled (`ReleaseStore.undo_stage`: its staging copy removed, a release it moved into
releases/ but never recorded taken out again -- or, had it recorded the release as accepted, it is
accepted), the whole, fsynced .part is *kept* and nothing is reported yet: the next offer of it
(the trainer repeats an unanswered offer on the sorter's heartbeats) stages it again straight from
the .part, no byte downloaded twice, on the `prepare.Retries` schedule (60 s, doubling up to 15
min).  Only after its 5 tries is it refused with that check (`prepare-timeout`
/ `prepare-died` / `store`) and reported; the trainer then never offers it to this sorter again
(`ReleaseBook.answered`): to retry, offer it anew under a higher release number.  A manifest whose
release number is not the offer's is refused `manifest` (the store would otherwise hold a release
the trainer never offered).

Power cuts (`crash.py`: `download.chunk`, `download.complete`, `download.unpacked` here; the
store's `stage.*`, `verify.*` and `state.*` points in the helper, which kills this process too): a restart
resumes from the .part's size (chunks are fsynced; a power cut may still leave a torn tail).
Every byte is checked by hash at `finish`, never loaded before: a download that was resumed and
fails `file-hash`/`file-size` is discarded and downloaded again from byte 0 (not reported as a
refusal: the tear was ours); one never resumed is refused.  The unpack directory is removed at
start-up (`clean_staging`); what `stage` leaves is the store's own (old release or new, never a mix).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from sorterd.data.files import fsync_dir, fsync_path, write_json_atomic
from sorterd.link.wire import ReleaseChunk, ReleaseFile, ReleaseOffer, ReleaseResult
from sorterd.release import crash
from sorterd.release.prepare import PREPARE_CHECKS, Retries, Staged
from sorterd.release.store import PART_SUFFIX, ReleaseStore, StoreError
from sorterd.release.verify import Refused

log = logging.getLogger(__name__)

REPORTS = "reports.json"
OFFER_SUFFIX = PART_SUFFIX + ".json"
READ_BLOCK = 1 << 20  # unpacking reads the .part this much at a time (never the whole release in memory)


class ResultQueue:
    """Release results waiting for the trainer's ACK, kept in `<models.dir>/reports.json` (atomic
    rename + fsync) so a result -- a health rollback above all -- made while the link is down is
    reported when it comes back.  Thread-safe: `put`/`done` from threads, `pending` from the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pending: list[ReleaseResult] = self._load()

    def _load(self) -> list[ReleaseResult]:
        try:
            raw = json.loads(self.path.read_text())
            return [ReleaseResult(int(r["release"]), str(r["status"]), str(r["check"]), str(r["detail"]))
                    for r in raw["pending"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:  # written atomically: a damaged disk
            log.error("release reports: %s unreadable (%s): its unsent results are lost; starting empty",
                      self.path, exc)
            return []

    def put(self, result: ReleaseResult) -> None:
        """Queue `result` (blocking: written before it returns); the same (release, status) once."""
        with self._lock:
            self._pending = [r for r in self._pending if (r.release, r.status) != (result.release, result.status)]
            self._pending.append(result)
            self._save()

    def done(self, result: ReleaseResult) -> None:
        with self._lock:
            left = [r for r in self._pending if r != result]
            if len(left) != len(self._pending):
                self._pending = left
                self._save()

    def pending(self) -> list[ReleaseResult]:
        with self._lock:
            return list(self._pending)

    def _save(self) -> None:
        write_json_atomic(self.path, {"pending": [asdict(r) for r in self._pending]})


def _offer_doc(offer: ReleaseOffer) -> dict[str, Any]:
    return {"release": offer.release, "manifest_sha256": offer.manifest_sha256, "total_bytes": offer.total_bytes,
            "files": [asdict(f) for f in offer.files]}


def _offer_from(doc: dict[str, Any]) -> ReleaseOffer:
    return ReleaseOffer(int(doc["release"]), str(doc["manifest_sha256"]), int(doc["total_bytes"]),
                        tuple(ReleaseFile(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in doc["files"]))


class Stager(Protocol):
    """What stages a whole download into the store (`sorterd.release.prepare.ChildStager`: the
    verification and the QA gate in the low-priority helper process)."""

    def stage(self, release: int, unpacked: Path) -> Staged:
        """Stage the download of offered release `release`, split into `unpacked`; raises `Refused`
        (the failed check; `prepare-timeout` / `prepare-died`: nothing staged) or `StoreError`."""
        ...


class Downloader:
    """The sorter's `ReleaseSide` (sorterd.link.client): offers in, the store's staging out.  Only the
    link client's calls touch it, one at a time (the client awaits each), so it needs no lock."""

    def __init__(self, store: ReleaseStore, stager: Stager, reports: ResultQueue, *,
                 running: Callable[[], int | None], auto_activate: bool = False,
                 on_refused: Callable[[str], None] | None = None) -> None:
        """`on_refused(check)`: each refusal, as the daemon counts it (`sorterd_model_refusals_total`)."""
        self.store, self.stager, self.reports = store, stager, reports
        self.on_refused = on_refused
        self._running, self.auto_activate = running, auto_activate
        self.staging = store.root / "staging"
        self.refused: set[int] = set()  # refused in this run: not taken again until restart
        self._answered: set[int] = set()  # already-held releases answered "accepted" again in this run
        self.current: ReleaseOffer | None = None
        self.size = 0
        self.resumed = False  # the current download continued a .part left by an earlier run
        self.retries = Retries()  # staging that failed for this machine's sake: when to try again

    # -- the link client's calls -------------------------------------------------------------

    def running(self) -> int:
        return self._running() or 0

    def results(self) -> list[ReleaseResult]:
        return self.reports.pending()

    def reported(self, result: ReleaseResult) -> None:
        self.reports.done(result)

    def offered(self, offer: ReleaseOffer) -> int | None:
        n = offer.release
        if n in self.refused or (self.current is not None and n < self.current.release):
            return None
        if self.retries.waiting(n):
            return None  # its staging failed for this machine's sake a moment ago: not yet again
        floor = self.store.floor()
        if n in self.store.releases() and n <= floor.highest:
            self._discard(n)
            if n not in self._answered:
                self._answered.add(n)
                self.reports.put(ReleaseResult(n, "accepted", "", f"release {n} is already in this sorter's store"))
            return None
        if not floor.allows(n):
            self._refuse(n, "downgrade", f"release {n} is not above {floor.highest}, the highest this sorter has "
                         f"accepted; nothing downloaded (to go back: sorterd models pin {n})")
            return None
        if offer.total_bytes > self.store.max_bytes:
            self._refuse(n, "oversized", f"release {n} is {offer.total_bytes} bytes; this sorter takes at most "
                         f"{self.store.max_bytes} ([models] max_release_mb); nothing downloaded")
            return None
        return self._start(offer)

    def received(self, chunk: ReleaseChunk) -> int:
        offer = self.current
        if offer is None or chunk.release != offer.release or chunk.offset != self.size:
            return self.size  # not the chunk asked for: the client asks again from here
        if self.size + len(chunk.data) > offer.total_bytes:
            raise ValueError(f"release {offer.release}: a chunk past total_bytes {offer.total_bytes}")
        with open(self._part(offer.release), "ab") as f:
            f.write(chunk.data)
            crash.point("download.chunk")
            f.flush()
            os.fsync(f.fileno())
        self.size += len(chunk.data)
        return self.size

    def finish(self, release: int) -> None:
        offer = self.current
        if offer is None or offer.release != release or self.size != offer.total_bytes:
            log.error("release %d: finish without a whole download (%s bytes)", release, self.size)
            return
        crash.point("download.complete")
        unpacked = self.staging / f"{release}.unpack"
        try:
            self._unpack(offer, unpacked)
            crash.point("download.unpacked")
            v = self.stager.stage(release, unpacked)
        except StoreError as exc:
            self._postpone(release, "store", str(exc))
            return
        except Refused as exc:
            if exc.check in PREPARE_CHECKS:
                self._postpone(release, exc.check, exc.detail)
                return
            if self.resumed and exc.check in ("file-hash", "file-size"):
                log.warning("release %d: the resumed download fails %s (%s); downloading it again from byte 0",
                            release, exc.check, exc.detail)
                self._discard(release)
                return
            log.error("release %d: refused: %s", release, exc)
            self._refuse(release, exc.check, exc.detail)
            return
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
        self.retries.done(release)
        why = "staged"
        if self.auto_activate:
            try:
                self.store.activate(release, "auto_activate: downloaded from the trainer")
                why = "staged and activated ([models] auto_activate)"
            except (StoreError, Refused) as exc:
                why = f"staged; activating it failed: {exc}"
        log.info("release %d from %s: %s (staged in the helper, %.2f s)", release, v.trainer, why, v.seconds)
        self.reports.put(ReleaseResult(release, "accepted", "", f"release {release} {why}"))
        self._discard(release)

    # -- internals ---------------------------------------------------------------------------

    def _part(self, release: int) -> Path:
        return self.staging / f"{release}{PART_SUFFIX}"

    def _postpone(self, release: int, check: str, detail: str) -> None:
        """Staging failed for this machine's sake (`check`): keep the whole .part and stage it again
        on a later offer, on the `retries` schedule; refused and reported once that gives up."""
        again = self.retries.failed(release)
        if again is None:
            self._refuse(release, check, f"{detail} (staging tried {self.retries.attempts} times)")
            return
        log.warning("release %d: staging failed (%s: %s); the download is kept and staged again when the trainer "
                    "next offers it, in %.0f s or more (try %d of %d)", release, check, detail, again[0], again[1],
                    self.retries.attempts)

    def _refuse(self, release: int, check: str, detail: str) -> None:
        """Refused (nothing of it kept); the result queued for the trainer."""
        log.warning("release %d: refused (%s): %s", release, check, detail)
        self.refused.add(release)
        if self.on_refused is not None:
            self.on_refused(check)
        self._discard(release)
        self.reports.put(ReleaseResult(release, "refused", check, detail))

    def _start(self, offer: ReleaseOffer) -> int:
        """The offset to download `offer` from: the .part's size when it is a download of this very
        offer, else 0 (every other release's download discarded)."""
        for p in sorted(self.staging.glob(f"*{PART_SUFFIX}*")):
            if not p.name.startswith(f"{offer.release}{PART_SUFFIX}"):
                p.unlink(missing_ok=True)
        part, meta = self._part(offer.release), self.staging / f"{offer.release}{OFFER_SUFFIX}"
        size = part.stat().st_size if part.is_file() else -1
        try:
            same = _offer_from(json.loads(meta.read_text())) == offer
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same or not 0 <= size <= offer.total_bytes:
            if size >= 0 or meta.exists():
                log.warning("release %d: discarding a partial download of another offer (%d bytes)", offer.release,
                            max(size, 0))
            part.unlink(missing_ok=True)
            write_json_atomic(meta, _offer_doc(offer))
            part.touch()
            fsync_path(part)
            fsync_dir(self.staging)
            size = 0
        self.current, self.size, self.resumed = offer, size, size > 0
        return size

    def _discard(self, release: int) -> None:
        for p in (self._part(release), self.staging / f"{release}{OFFER_SUFFIX}"):
            p.unlink(missing_ok=True)
        if self.current is not None and self.current.release == release:
            self.current, self.size = None, 0

    def _unpack(self, offer: ReleaseOffer, out: Path) -> None:
        """The .part split into `out/<name>` by the offer's list (sizes summing to the .part's),
        every file and the directory fsynced; bounded reads."""
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        with open(self._part(offer.release), "rb") as src:
            for f in offer.files:
                dst = out / f.name  # a plain name: the wire parser let nothing else through
                with open(dst, "xb") as w:
                    left = f.size
                    while left:
                        block = src.read(min(READ_BLOCK, left))
                        if not block:
                            raise Refused("file-size", f"{self._part(offer.release)}: ends inside {f.name}")
                        w.write(block)
                        left -= len(block)
                    w.flush()
                    os.fsync(w.fileno())
        fsync_dir(out)


def rollback_reporter(reports: ResultQueue) -> Callable[[int, str], None]:
    """`ReleaseWatcher.on_rolled_back` for the composition root: each health rollback queued for
    the trainer as RELEASE_RESULT rolled-back (check "health", why); blocking (a thread), never raises."""
    def report(release: int, why: str) -> None:
        try:
            reports.put(ReleaseResult(release, "rolled-back", "health", why))
        except (OSError, ValueError) as exc:
            log.error("release %d: the health rollback could not be queued for the trainer (%s)", release, exc)
    return report


def reports_for(store: ReleaseStore) -> ResultQueue:
    """The store's result queue (`<models.dir>/reports.json`)."""
    return ResultQueue(store.root / REPORTS)
