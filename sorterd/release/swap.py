"""Going live on the sorter: the store's active release swapped in between two frame pairs, its
health watched, and rolled back by itself when it sorts unlike the release before it (DESIGN
§4a "swap between two frame pairs → health watch → commit, or roll back"; issue 12 items 5-7).

How a release reaches the running daemon: `sorterd models activate N` (or `rollback`) writes the
store's state.json (atomic rename); the daemon's `ReleaseWatcher` reads it every
`[models] poll_s` seconds (in a thread: file work never runs on the loop).  When `active`
differs from what runs, the watcher has a helper *process* (`sorterd.release.prepare`, lowest
priority, `[models] prepare_timeout_s`) run `check_release` on it: re-verify the stored release
(`ReleaseStore.verify_stored`: signature, files, sizes, hashes), open it and run the golden check
and the reference kit (`qa_problems`: the whole QA gate, with the newest recorded kit,
`KitPolicy`) -- so that none of that CPU work takes the pipeline workers' GIL.  Then, in the
watcher's nice-19 thread, it opens what the helper checked (`open_prepared`: the session only)
and publishes it with `Pipeline.swap_model` (`LiveModel`, the one swap mechanism of
`sorterd/parts/inference/live.py`): the pair being computed finishes on the old release, the next
one is classified by the new, and every stone row records the release that classified it
(`model_version` = "<manifest version>@r<N>").  Start-up runs the same checks in-process
(`open_active` -> `open_release`: no stones yet) and opens the active release (or None: the
configured bundle runs).  A release that fails a check is refused (counted by check, logged),
not retried until state.json changes, and the old one keeps running.  One whose helper times out
or dies says nothing about the release (a saturated CPU starves the SCHED_IDLE helper): the old
one keeps running and it is tried again on `prepare.Retries`' schedule, refused
(`prepare-timeout`, `prepare-died`) only when that gives up.

The health watch (`HealthWatch`): the last `health_stones` rows of the release before the swap
are the baseline; once the new release has classified as many, its flagged rate, SELECT rate
and (color, clarity) mix are compared with the baseline's; past `[models]` bounds the old model
is swapped back in at once and the store is rolled back on the watcher's next step
(`ReleaseStore.rollback(why, of=release)`, state.json, so a restart runs the old one too: only
while the judged release is still active -- an operator may have activated another meanwhile);
why is logged and counted, and the trainer told.  A release whose store rollback cannot be made
is not swapped in again by this daemon (`refused`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorterd.data.bundle import ModelError, sha256_file
from sorterd.parts.inference import InferenceOptions, Model, Prediction
from sorterd.parts.inference.golden import GOLDEN_ATOL, check_golden
from sorterd.parts.inference.open import open_model
from sorterd.release import crash
from sorterd.release.prepare import PREPARE_CHECKS, Prepared, Retries, prepare_in_child
from sorterd.release.qa import KitPolicy, latest_kit, qa_problems
from sorterd.release.sign import MANIFEST
from sorterd.release.store import QaGate, ReleaseStore, StoreError
from sorterd.release.verify import Refused, Verified

if TYPE_CHECKING:
    from sorterd.config import Config, ModelsConfig
    from sorterd.data.bundle import Manifest
    from sorterd.metrics import Metrics
    from sorterd.sorting.pipeline import Pipeline
    from sorterd.sorting.record import StoneRow

log = logging.getLogger(__name__)


class ReleasedModel:
    """A model opened from the store's releases/<N>: its version names the release."""

    def __init__(self, model: Model, release: int) -> None:
        self.inner, self.release = model, release
        self.manifest: Manifest = model.manifest

    @property
    def version(self) -> str:
        return f"{self.inner.version}@r{self.release}"

    @property
    def backend(self) -> str:
        return self.inner.backend

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        return self.inner.predict(crops_hwc)

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        return self.inner.predict_halves(halves)

    def close(self) -> None:
        self.inner.close()


def kit_policy(cfg: Config) -> KitPolicy:
    """`[models]`'s reference-kit rule: the newest kit calibration recorded for this machine."""
    root, machine = Path(cfg.calibration.dir), cfg.machine.name
    return KitPolicy(lambda: latest_kit(root, machine), cfg.models.require_kit, cfg.models.min_agreement)


def _gate(model: Model, path: Path, kit: KitPolicy | None) -> None:
    """The QA gate on an opened model: golden always, the reference kit when `kit` is given."""
    if kit is None:
        problems = [("golden", p) for p in check_golden(model, path, GOLDEN_ATOL["fp32"])]
    else:
        try:
            recorded, where = kit.load()
        except ValueError as exc:
            raise Refused("reference-kit", str(exc)) from None
        problems = qa_problems(model, path, recorded, None, kit.min_agreement, require_kit=kit.require)
        if recorded is not None:
            log.info("release QA: reference kit %s (%d stones)", where, len(recorded.labels))
    if problems:
        check, _ = problems[0]
        raise Refused(check, "; ".join(detail for _, detail in problems))


def _open(options: InferenceOptions, path: Path) -> Model:
    try:
        return open_model(options, path)
    except ModelError as exc:
        raise Refused("onnx-load", str(exc)) from None


def _checked(store: ReleaseStore, release: int, options: InferenceOptions,
             kit: KitPolicy | None) -> tuple[Verified, Model]:
    """Stored release `release` verified again, opened and QA-gated: the model open; `Refused`."""
    v = store.verify_stored(release)
    model = _open(options, v.path)
    try:
        _gate(model, v.path, kit)
    except BaseException:
        model.close()
        raise
    return v, model


def check_release(store: ReleaseStore, release: int, options: InferenceOptions,
                  kit: KitPolicy | None = None) -> Verified:
    """Every check a stored release must pass to go live -- verification and the QA gate (golden;
    and the reference kit when `kit` is given) -- with the model closed again; raises `Refused`.
    The release watcher runs it in its helper process (`sorterd.release.prepare`)."""
    v, model = _checked(store, release, options, kit)
    model.close()
    return v


def open_release(store: ReleaseStore, release: int, options: InferenceOptions,
                 kit: KitPolicy | None = None) -> ReleasedModel:
    """Verify stored release `release` again, open it, run the QA gate (golden; and the reference
    kit when `kit` is given), in this process (start-up: no stones yet); raises `Refused` (check
    named) -- blocking: call it from a thread."""
    _, model = _checked(store, release, options, kit)
    return ReleasedModel(model, release)


def open_prepared(store: ReleaseStore, prepared: Prepared, options: InferenceOptions) -> ReleasedModel:
    """What the helper checked (`prepare_in_child`), opened in this process: only the backend's
    session.  manifest.json must still be the bytes the helper verified (the model's own open
    checks model.onnx against the manifest's sha256), else `Refused("file-hash")`."""
    path = store.path(prepared.release)
    if sha256_file(path / MANIFEST) != prepared.manifest_sha256:
        raise Refused("file-hash", f"{path / MANIFEST}: changed since the helper verified it")
    model = _open(options, path)
    if model.manifest.onnx_sha256.lower() != prepared.onnx_sha256:
        model.close()
        raise Refused("file-hash", f"{path / 'model.onnx'}: not the one the helper verified")
    return ReleasedModel(model, prepared.release)


def prepare_and_open(store: ReleaseStore, release: int, options: InferenceOptions, kit: KitPolicy | None,
                     timeout_s: float) -> ReleasedModel:
    """The watcher's way (its thread): the checks in the helper process, then the open here."""
    t0 = time.perf_counter()
    prepared = prepare_in_child(store, release, options, kit, timeout_s)
    t1 = time.perf_counter()
    crash.point("swap.prepared")
    model = open_prepared(store, prepared, options)
    log.info("release %d: checked in the helper in %.2f s (%.2f s its own), opened here in %.3f s", release,
             t1 - t0, prepared.seconds, time.perf_counter() - t1)
    return model


def qa_gate(options: InferenceOptions, kit: KitPolicy | None) -> QaGate:
    """`ReleaseStore.stage`'s gate (`sorterd models stage`; a download over the link, in the helper
    process `sorterd.release.prepare`): the staged release opened with the sorter's backend, golden
    + reference kit (golden only when `kit` is None), closed again."""
    def gate(v: Verified) -> list[tuple[str, str]]:
        model = _open(options, v.path)
        try:
            _gate(model, v.path, kit)
        except Refused as exc:
            return [(exc.check, exc.detail)]
        finally:
            model.close()
        return []
    return gate


def open_active(store: ReleaseStore, options: InferenceOptions) -> ReleasedModel | None:
    """The store's active release opened (start-up), or None when there is none."""
    active = store.state().active
    return None if active is None else open_release(store, active, options)


def open_store(cfg: Config) -> ReleaseStore | None:
    """The `[models]` store, or None when the sorter trusts no release key (it cannot accept any);
    what a power cut left in staging/ is removed (never loaded)."""
    from sorterd.release.keys import load_public

    m = cfg.models
    if not m.trusted_keys:
        return None
    store = ReleaseStore(cfg.resolve(m.dir), [load_public(cfg.resolve(k)) for k in m.trusted_keys],
                         int(m.max_release_mb * 1e6))
    left = store.clean_staging()
    if left:
        log.warning("release store: removed what a stop left in staging: %s", ", ".join(left))
    return store


def open_for_run(cfg: Config, store: ReleaseStore | None, configured: Callable[[], Model]) -> tuple[Model, int | None]:
    """Start-up: the store's active release when it has one and it opens, else the configured
    bundle (`configured()`); and which release runs (None: the configured bundle)."""
    if store is not None:
        try:
            model = open_active(store, cfg.inference)
        except (Refused, StoreError) as exc:
            log.error("release store: the active release cannot run (%s); the configured bundle %s runs instead",
                      exc, cfg.inference.model)
        else:
            if model is not None:
                log.info("release %d: %s opened from %s", model.release, model.version, store.root)
                return model, model.release
    return configured(), None


@dataclass(frozen=True)
class HealthBounds:
    stones: int
    max_flagged_delta: float
    max_select_delta: float
    max_mix_distance: float

    @classmethod
    def from_config(cls, m: ModelsConfig) -> HealthBounds:
        return cls(m.health_stones, m.health_max_flagged_delta, m.health_max_select_delta, m.health_max_mix_distance)


def _figures(rows: list[tuple[bool, bool, str]]) -> tuple[float, float, Counter[str]]:
    n = len(rows)
    return (sum(f for f, _, _ in rows) / n, sum(s for _, s, _ in rows) / n, Counter(c for _, _, c in rows))


def compare(baseline: list[tuple[bool, bool, str]], new: list[tuple[bool, bool, str]], b: HealthBounds) -> str:
    """Why `new` (flagged, SELECT, class per stone) sorts unlike `baseline` ('' = healthy)."""
    f0, s0, m0 = _figures(baseline)
    f1, s1, m1 = _figures(new)
    mix = 0.5 * sum(abs(m0[k] / len(baseline) - m1[k] / len(new)) for k in set(m0) | set(m1))
    why = []
    if abs(f1 - f0) > b.max_flagged_delta:
        why.append(f"flagged rate {f1:.0%} vs {f0:.0%} (bound ±{b.max_flagged_delta:.0%})")
    if abs(s1 - s0) > b.max_select_delta:
        why.append(f"SELECT rate {s1:.0%} vs {s0:.0%} (bound ±{b.max_select_delta:.0%})")
    if mix > b.max_mix_distance:
        why.append(f"class mix distance {mix:.2f} (bound {b.max_mix_distance:.2f})")
    return "; ".join(why)


class HealthWatch:
    """Fed every finished row (loop thread); calls `on_unhealthy(why)` once when the release under
    watch, after `bounds.stones` stones, sorts unlike the baseline."""

    def __init__(self, bounds: HealthBounds, on_unhealthy: Callable[[str, str], None],
                 on_committed: Callable[[str], None] | None = None) -> None:
        self.bounds, self.on_unhealthy, self.on_committed = bounds, on_unhealthy, on_committed
        self.recent: deque[tuple[str, tuple[bool, bool, str]]] = deque(maxlen=bounds.stones)
        self.watching: str | None = None
        self.baseline: list[tuple[bool, bool, str]] = []
        self.new: list[tuple[bool, bool, str]] = []
        self.verdicts: list[tuple[str, str]] = []  # (version, '' healthy | why rolled back)

    def swapped(self, old_version: str, new_version: str) -> None:
        self.baseline = [s for v, s in self.recent if v == old_version]
        self.watching, self.new = new_version, []

    def observe(self, row: StoneRow) -> None:
        if row.color is None or row.clarity is None:
            return  # not classified (unsortable, lighting): says nothing about the model
        sample = (bool(row.flagged), row.bin == "SELECT", f"{row.color}/{row.clarity}")
        self.recent.append((row.model_version, sample))
        if row.model_version != self.watching:
            return
        self.new.append(sample)
        if len(self.new) < self.bounds.stones:
            return
        version, self.watching = self.watching, None
        why = compare(self.baseline, self.new, self.bounds) if self.baseline else ""
        self.verdicts.append((version, why))
        if why:
            self.on_unhealthy(version, why)
        else:
            log.info("release health: %s sorted %d stones like the release before it: committed", version, len(self.new))
            if self.on_committed is not None:
                self.on_committed(version)


def _background_priority() -> None:
    """The preparing thread yields the CPU to the sorting workers (Linux: a thread's own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: it still works, only less politely
        log.debug("release watch: cannot lower the preparing thread's priority (%s)", exc)


class ReleaseWatcher:
    """The daemon's side of the store: swaps in what state.json names active, watches its health,
    rolls back by itself.  `run()` is a loop task; every file and model step runs in a thread."""

    def __init__(self, store: ReleaseStore, options: InferenceOptions, pipeline: Pipeline, metrics: Metrics,
                 bounds: HealthBounds, poll_s: float, running: int | None, kit: KitPolicy | None = None,
                 prepare_timeout_s: float = 120.0) -> None:
        self.store, self.options, self.pipeline, self.metrics = store, options, pipeline, metrics
        self.poll_s, self.running, self.kit, self.prepare_timeout_s = poll_s, running, kit, prepare_timeout_s
        self.refused: set[int] = set()  # active releases that failed to open (not retried until state changes)
        # A helper that timed out or died says nothing about the release, only about this machine now
        # (a saturated CPU starves the SCHED_IDLE helper): tried again on this schedule, refused after it.
        self.retries = Retries()
        # Told (in a thread) of each health rollback: (the release taken back, why); the composition
        # root queues it for the trainer (sorterd.release.download.ResultQueue) -- the watcher knows no link.
        self.on_rolled_back: Callable[[int, str], None] | None = None
        self.health = HealthWatch(bounds, self._unhealthy, self._committed)
        self._rollback: tuple[int | None, str, str] | None = None  # (release, version, why) judged unhealthy
        self._trusted_back: int | None = None
        self._previous: tuple[Model, int | None] | None = None  # the model a swap replaced, kept open for a rollback
        # A release's checks run in a helper process (`prepare_and_open`), waited for here; its open
        # (the session only) and a replaced model's close run here too, at the lowest priority: a
        # swap under load must not take the workers' CPU (the pair deadlines).
        self._prepare = ThreadPoolExecutor(1, "sorterd-release", initializer=_background_priority)
        pipeline.row_observers.append(self.health.observe)

    def _retire(self, model: Model) -> None:
        """Close a replaced model once no pair uses it, in the preparing thread (never a worker's time)."""
        def closer(m: Model) -> None:
            try:
                self._prepare.submit(m.close)
            except RuntimeError:  # the watcher stopped: close it here
                m.close()
        self.pipeline.model.retire(model, closer)

    def _committed(self, version: str) -> None:
        """The new release passed its health watch: the one before it need not stay open."""
        if self._previous is not None:
            self._retire(self._previous[0])
            self._previous = None

    def _unhealthy(self, version: str, why: str) -> None:
        """Loop thread, from the row that completed the watch: the release before it, still open, is
        swapped straight back in (the next pair), and the store is rolled back on the next step."""
        log.error("release health: %s sorts unlike the release before it (%s): rolling back", version, why)
        self._rollback = (self.running, version, why)  # the watch is on the release swapped in last
        if self._previous is not None:
            model, release = self._previous
            self._retire(self.pipeline.swap_model(model))
            self.running, self._previous = release, None

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.poll_s)
        finally:
            self._prepare.shutdown(wait=False, cancel_futures=True)

    async def step(self) -> None:
        """One look at the store: a pending rollback first, then the active release."""
        if self._rollback is not None:
            release, version, why = self._rollback
            self._rollback = None
            try:
                # Only from the release judged: if the operator activated another meanwhile, a plain
                # rollback would make the bad one active again (state.previous) and swap it back in.
                state = await asyncio.to_thread(self.store.rollback, f"health check: {version}: {why}", release)
                self._trusted_back = state.active  # the release it ran before: swapped in unwatched
                self.metrics.model_rollbacks.inc()
            except (StoreError, Refused) as exc:
                # Not swapped in again by this daemon while state.json names it (`refused`).
                if release is not None:
                    self.refused.add(release)
                log.error("release health: the store is not rolled back (%s); %s is not swapped in again", exc, version)
            if self.on_rolled_back is not None and release is not None:
                await asyncio.to_thread(self.on_rolled_back, release, why)
        try:
            active = (await asyncio.to_thread(self.store.state)).active
        except StoreError as exc:
            log.error("release watch: %s", exc)
            return
        if self._rollback is not None:
            # The health watch judged while state.json was being read: that read is from before the
            # rollback (it still names the bad release, and `running` is now the one before it).
            # Acting on it would swap the bad release straight back in; the next step rolls back first.
            return
        if active is None or active == self.running or active in self.refused or self.retries.waiting(active):
            return
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                self._prepare, prepare_and_open, self.store, active, self.options, self.kit, self.prepare_timeout_s)
        except Refused as exc:
            again = self.retries.failed(active) if exc.check in PREPARE_CHECKS else None
            if again is not None:
                log.warning("release %d: its checks did not complete (%s); %s keeps running; tried again in %.0f s "
                            "(try %d of %d)", active, exc, self.pipeline.model.version, again[0], again[1],
                            self.retries.attempts)
                return
            self.refused.add(active)
            self.metrics.model_refusals.labels(exc.check).inc()
            log.error("release %d: refused at swap: %s; %s keeps running", active, exc, self.pipeline.model.version)
            return
        except StoreError as exc:
            self.refused.add(active)
            log.error("release %d: %s", active, exc)
            return
        self.retries.done(active)
        crash.point("swap.opened")
        old = self.pipeline.swap_model(model)
        crash.point("swap.swapped")
        if self._previous is not None:  # the one before the previous: no rollback goes to it without a re-open
            self._retire(self._previous[0])
        self._previous = (old, self.running)
        self.running = active
        self.metrics.model_swaps.inc()
        if active != self._trusted_back:  # a rollback's target is not judged against the bad release
            self.health.swapped(old.version, model.version)
        self._trusted_back = None
        log.info("release %d live: %s replaces %s between two frame pairs", active, model.version, old.version)
