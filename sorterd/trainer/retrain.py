"""Retraining on the trainer (§5.4): count new labels, trigger, fine-tune, compare, gate a candidate.

    DIR/retrain/status.json      what the runner is doing (atomic; `read_status`)
    DIR/retrain/request.json     a pending "run now" (`request_run`: the page's button, `--now`)
    DIR/retrain/run.lock         flock held by the one runner for its whole life
    DIR/retrain/runs/<run>/      train.log, progress.json, compare.json, evaluate.json, report/
    DIR/models/<run>/            the bundles trained here; DIR/models/model_log.jsonl (§5.5)
    DIR/releases/candidates/<version>/   bundle + candidate.json (the next issue signs it)

New labels.  A label is new when it is classified (colour and clarity; skips and rejects are
not trainable) and its stone is in no part (train, val, test) of the split snapshot of the last
model trained on this dataset -- the last entry of DIR/models/model_log.jsonl whose data is DIR,
else the --model bundle's own snapshot if it was trained on DIR, else none (every label is new).
`sorterd train` counts its §5.5 ``new_samples_since_last`` the same way, so the log entry of a
retrained model counts exactly these labels (duplicates by image hash aside: training drops
them, this count does not hash images).

Trigger (§5.4): `RetrainPolicy` -- ``batch`` (500) new labels; or ``weekly_min`` (100) new labels
once ``week_s`` (7 days) have passed since the last model; or a request (`request_run`), which
runs whatever the count.  The accuracy-drop and new-lot triggers of §5.4 are the sorter's QA's.

A run (`run_retrain`): ``sorterd train --from <model>`` on DIR in a subprocess (a crash or a
SIGKILL of training is contained; the caller's event loop is never blocked when it runs this in
a thread, `watch`), then ``sorterd evaluate`` (metrics, §8.4 verdict, HTML report with the
confusion matrices and reliability diagram) and ``sorterd compare <model> <new>`` on the new
model's held-out test lots.  `gate` lets through only a model that is *better* on cost-weighted
accuracy (the paired bootstrap of `sorterd compare` says "new": a tie is not better) and meets
§8.4 items 1-5 (overall >= 0.90, CUT purity >= 0.95, CUT recall >= 0.85, no class < 0.70,
cost-weighted >= 0.90); item 6 (the reference kit) is left to the sorter and said so in
candidate.json.  Every refusal names the criterion and the value.

States: idle -> training -> comparing -> done | failed; a status that says training or comparing
while no process holds run.lock is read as ``interrupted`` (the runner was killed: never "done").
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sorterd.data.dataset import LABELS_FILE, StoneLabel, read_labels
from sorterd.data.files import fsync_dir, write_json_atomic
from sorterd.train.splits import snapshot_ids

ACTIVE = ("training", "comparing")
STATES = ("idle", *ACTIVE, "done", "failed", "interrupted")
MAX_REASON = 200
EXIT_BUSY = 75  # sorterd retrain's: another runner holds the lock
_log = logging.getLogger(__name__)
QA_CRITERION = "QA reference stones"  # §8.4 item 6: checked on the sorter (next issue)


class RetrainError(ValueError):
    """Bad input to the retrain runner (one line: what was wrong and what is allowed)."""


class RetrainBusy(RuntimeError):
    """Another runner holds DIR/retrain/run.lock."""


@dataclass(frozen=True)
class RetrainPolicy:
    """§5.4's schedule."""

    batch: int = 500
    weekly_min: int = 100
    week_s: float = 7 * 86400.0


# -- paths -----------------------------------------------------------------------------------


def retrain_dir(root: Path) -> Path:
    return root / "retrain"


def models_dir(root: Path) -> Path:
    return root / "models"


def model_log(root: Path) -> Path:
    return models_dir(root) / "model_log.jsonl"


def candidates_dir(root: Path) -> Path:
    return root / "releases" / "candidates"


# -- new labels and the trigger ---------------------------------------------------------------


def current_labels(root: Path) -> list[StoneLabel]:
    """The labels training uses: the review page's `effective_labels` (undo, agreement) where it exists."""
    for module in ("sorterd.trainer.labels", "sorterd.data.dataset"):
        try:
            effective = getattr(importlib.import_module(module), "effective_labels", None)
        except ImportError:
            continue
        if effective is not None:
            return list(effective(root))
    path = root / LABELS_FILE
    return read_labels(path) if path.exists() else []


def _log_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed writer
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _manifest(bundle: Path) -> dict[str, Any]:
    try:
        m = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise RetrainError(f"{bundle}: not a model bundle ({exc}); give the current model's folder") from None
    if not isinstance(m, dict):
        raise RetrainError(f"{bundle}/manifest.json: not a JSON object")
    return m


def seen_ids(root: Path, bundle: Path) -> set[str]:
    """Stones the last model of this dataset's line saw in any split (see the module docstring)."""
    here = str(root.resolve())
    for entry in reversed(_log_entries(model_log(root))):
        if entry.get("data") == here and entry.get("splits"):
            return snapshot_ids(root / "splits" / str(entry["splits"]))
    training = _manifest(bundle).get("training") or {}
    data, splits = training.get("data") or {}, training.get("splits") or {}
    if isinstance(data, dict) and data.get("dir") == here and isinstance(splits, dict) and splits.get("dir"):
        return snapshot_ids(Path(splits["dir"]))
    return set()


def new_label_ids(root: Path, bundle: Path) -> list[str]:
    """Classified labels whose stones the last model never saw, in file order."""
    seen = seen_ids(root, bundle)
    return [lab.stone_id for lab in current_labels(root) if lab.classified and lab.stone_id not in seen]


def last_model_time(root: Path, bundle: Path) -> datetime | None:
    """When the last model of this line was made: the newest log entry here, else the bundle's `created`."""
    entries = _log_entries(model_log(root))
    stamp = entries[-1].get("timestamp") if entries else _manifest(bundle).get("created")
    try:
        t = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def trigger(new: int, since_last_s: float | None, requested: str | None,
            policy: RetrainPolicy = RetrainPolicy()) -> str | None:
    """Why a run is due now (§5.4), or None.  ``since_last_s`` None: no model time known (not weekly)."""
    if requested:
        return f"requested: {requested}"
    if new >= policy.batch:
        return f"{new} new labels (>= {policy.batch})"
    if since_last_s is not None and since_last_s >= policy.week_s and new >= policy.weekly_min:
        return f"weekly: {since_last_s / 86400:.1f} days since the last model, {new} new labels (>= {policy.weekly_min})"
    return None


def due(root: Path, bundle: Path, policy: RetrainPolicy = RetrainPolicy(),
        now: datetime | None = None) -> tuple[str | None, int]:
    """(the reason a run is due, or None; the new-label count) for this dataset and current model."""
    new = len(new_label_ids(root, bundle))
    last = last_model_time(root, bundle)
    now = now or datetime.now(timezone.utc)
    req = _read_json(retrain_dir(root) / "request.json")
    return trigger(new, (now - last).total_seconds() if last else None, req.get("reason"), policy), new


# -- status --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _lock_held(root: Path) -> bool:
    """True while a runner holds run.lock (the kernel drops it when that process dies, SIGKILL too)."""
    path = retrain_dir(root) / "run.lock"
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def read_status(root: Path) -> dict[str, Any]:
    """The runner's state for the page and `sorterd retrain --status` (never blocks for long: a few reads).

    Keys: state (idle/training/comparing/done/failed/interrupted), run, reason, started, finished,
    epoch, epochs, fraction, eta_s (while training), new_labels, log_entry (§5.5, when done),
    reports {train_log, evaluate, compare, report_html}, candidate (path) or refused (reasons),
    error (failed), request (a pending one).
    """
    status = _read_json(retrain_dir(root) / "status.json") or {"state": "idle"}
    if status.get("state") in ACTIVE and not _lock_held(root):
        status = {**status, "state": "interrupted", "interrupted_in": status["state"]}
    if status.get("state") == "training" and status.get("run"):
        prog = _read_json(retrain_dir(root) / "runs" / str(status["run"]) / "progress.json")
        status.update({k: prog.get(k) for k in ("epoch", "epochs", "fraction", "eta_s", "phase") if k in prog})
    req = _read_json(retrain_dir(root) / "request.json")
    if req:
        status["request"] = req
    return status


def _write_status(root: Path, status: dict[str, Any]) -> None:
    retrain_dir(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(retrain_dir(root) / "status.json", status)


def request_run(root: Path, reason: str) -> dict[str, Any]:
    """Ask for a run now (§5.4 "on request"); the runner takes it at its next check. Returns the request + status."""
    if not isinstance(reason, str) or not reason.strip():
        raise RetrainError("reason: must be a non-empty string saying why a retrain is wanted")
    if len(reason) > MAX_REASON:
        raise RetrainError(f"reason: {len(reason)} characters; at most {MAX_REASON} allowed")
    if not (root / LABELS_FILE).exists():
        raise RetrainError(f"{root}: no {LABELS_FILE}; give the trainer's dataset folder")
    req = {"reason": reason.strip(), "requested_at": _now()}
    retrain_dir(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(retrain_dir(root) / "request.json", req)
    return {"requested": True, **req, "status": read_status(root)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- gating ----------------------------------------------------------------------------------


def gate(comparison: dict[str, Any], evaluation: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refusals, pending) for a new model: better on cost-weighted accuracy AND §8.4 items 1-5.

    ``comparison`` is `sorterd compare --json`, ``evaluation`` the new model's `sorterd evaluate
    --json` on the same held-out stones.  A criterion that cannot be measured there (None) is a
    refusal, except the reference-kit check, which is pending (the sorter runs it).
    """
    refusals = []
    if comparison.get("better") != "new":
        lo, hi = comparison.get("cost_weighted_delta_ci95") or [None, None]
        refusals.append(f"not better on cost-weighted accuracy: {comparison.get('verdict')} (delta "
                        f"{comparison.get('cost_weighted_delta')}, 95% CI {lo} .. {hi})")
    pending = []
    for c in (evaluation.get("verdict") or {}).get("criteria", []):
        if str(c.get("name", "")).startswith(QA_CRITERION):
            pending.append(str(c["name"]))
        elif c.get("pass") is None:
            refusals.append(f"§8.4: {c['name']}: not measurable on the held-out stones")
        elif not c["pass"]:
            refusals.append(f"§8.4: {c['name']}: {c['value']:.4f} < {c['threshold']}")
    if not (evaluation.get("verdict") or {}).get("criteria"):
        refusals.append("§8.4: no verdict in the evaluation")
    return refusals, pending


# -- the run -----------------------------------------------------------------------------------


@contextmanager
def _runner_lock(root: Path) -> Iterator[None]:
    retrain_dir(root).mkdir(parents=True, exist_ok=True)
    with open(retrain_dir(root) / "run.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainBusy(f"{root}: a retrain is running already (retrain/run.lock is held)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sorterd(python: str, *args: str | Path) -> list[str]:
    return [python, "-m", "sorterd", *(str(a) for a in args)]


def _run_step(cmd: list[str], log: Path) -> int:
    """One child process, its output appended to ``log``; its exit status."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False).returncode


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-500:]


def run_retrain(root: Path, bundle: Path, reason: str, *, test_lots: Sequence[str] = (),
                train_args: Sequence[str] = (), python: str = sys.executable) -> dict[str, Any]:
    """One whole run (blocking: call it in a thread or a process); the final status.  RetrainBusy if one runs."""
    root, bundle = root.resolve(), bundle.resolve()
    _manifest(bundle)
    with _runner_lock(root):
        new = len(new_label_ids(root, bundle))
        run_id = datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%S")
        run_dir = retrain_dir(root) / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (retrain_dir(root) / "request.json").unlink(missing_ok=True)  # taken: a new request asks again
        out = models_dir(root) / run_id
        log = run_dir / "train.log"
        status: dict[str, Any] = {
            "state": "training", "run": run_id, "reason": reason, "started": _now(), "model": str(bundle),
            "new_labels": new, "bundle": str(out),
            "reports": {"train_log": str(log), "evaluate": str(run_dir / "evaluate.json"),
                        "compare": str(run_dir / "compare.json"), "report_html": str(run_dir / "report" / "report.html")},
        }
        _write_status(root, status)
        lots = ["--test-lots", ",".join(test_lots)] if test_lots else []
        code = _run_step(_sorterd(python, "train", "--data", root, "--out", out, "--from", bundle, "--no-progress",
                                  "--progress-json", run_dir / "progress.json", *lots, *train_args), log)
        if code != 0:
            return _finish(root, status, "failed", error=f"sorterd train exited {code}: {_tail(log)}")
        status["state"] = "comparing"
        _write_status(root, status)
        code = _run_step(_sorterd(python, "evaluate", "--model", out, "--data", root, "--json",
                                  run_dir / "evaluate.json", "--report", run_dir / "report"), log)
        if code == 5:  # no matplotlib: the figures without the HTML report
            status["reports"]["report_html"] = None
            code = _run_step(_sorterd(python, "evaluate", "--model", out, "--data", root, "--json",
                                      run_dir / "evaluate.json"), log)
        if code == 0:
            code = _run_step(_sorterd(python, "compare", bundle, out, "--data", root, "--json",
                                      run_dir / "compare.json"), log)
        if code != 0:
            return _finish(root, status, "failed", error=f"evaluate/compare exited {code}: {_tail(log)}")
        manifest = _manifest(out)
        version = str(manifest.get("version"))
        status["version"] = version
        status["log_entry"] = next((e for e in reversed(_log_entries(model_log(root)))
                                    if e.get("version") == version), None)
        comparison, evaluation = _read_json(run_dir / "compare.json"), _read_json(run_dir / "evaluate.json")
        refusals, pending = gate(comparison, evaluation)
        status["verdict"] = evaluation.get("verdict", {}).get("summary")
        status["comparison"] = comparison.get("verdict")
        if refusals:
            return _finish(root, status, "done", refused=refusals)
        cand = _make_candidate(root, out, version, comparison, evaluation, pending, reason, status)
        return _finish(root, status, "done", candidate=str(cand))


def _finish(root: Path, status: dict[str, Any], state: str, **extra: Any) -> dict[str, Any]:
    status = {**status, **extra, "state": state, "finished": _now()}
    _write_status(root, status)
    return status


def _make_candidate(root: Path, bundle: Path, version: str, comparison: dict[str, Any],
                    evaluation: dict[str, Any], pending: list[str], reason: str, status: dict[str, Any]) -> Path:
    """Copy the bundle to releases/candidates/<version>/ with candidate.json, all or nothing (rename)."""
    dest = candidates_dir(root) / version
    if dest.exists():
        raise RetrainError(f"{dest}: a candidate {version} exists already; remove it or train another version")
    staging = candidates_dir(root) / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    write_json_atomic(staging / "candidate.json", {
        "version": version, "created": _now(), "from": status["model"], "trigger": reason,
        "new_labels": status["new_labels"], "why": [
            f"better on cost-weighted accuracy: {comparison.get('verdict')} (delta "
            f"{comparison.get('cost_weighted_delta')}, 95% CI {comparison.get('cost_weighted_delta_ci95')})",
            f"§8.4 items 1-5 met on the held-out stones: {evaluation.get('verdict', {}).get('summary')}"],
        "pending": pending, "held_out": evaluation.get("data", {}), "n_stones": comparison.get("n_stones"),
        "metrics": comparison.get("metrics"), "log_entry": status.get("log_entry"), "reports": status["reports"],
    })
    fsync_dir(staging)
    os.replace(staging, dest)
    fsync_dir(dest.parent)
    return dest



async def watch(root: Path, bundle: Path, policy: RetrainPolicy = RetrainPolicy(), interval_s: float = 60.0,
                test_lots: Sequence[str] = (), train_args: Sequence[str] = (), python: str = sys.executable,
                stop_grace_s: float = 10.0) -> None:
    """For an asyncio process (`sorterd trainer --retrain-model`): the §5.4 schedule, forever.

    Every ``interval_s`` it checks `due` (in a worker thread: file reads); when a run is due it runs
    `run_retrain` in a child process (``python -m sorterd.trainer.retrain``, its own session, output
    appended to DIR/retrain/watch.log), awaited without blocking the event loop.  Cancelling the task
    (the trainer stopping) ends that child and its ``sorterd train`` with SIGTERM, then SIGKILL after
    ``stop_grace_s``: the kernel frees run.lock and `read_status` says ``interrupted``, never done.

    A run that did not finish "done" (training failed, a crash) is not retried for the same count:
    the 500/weekly triggers wait for more new labels; a request (the page's button) always runs.
    The model fine-tuned from stays ``bundle``: moving it to the sorter's active release is the
    release issue's.
    """
    failed_at: int | None = None  # the new-label count of the last failed run
    while True:
        reason, new = await asyncio.to_thread(due, root, bundle, policy)
        requested = reason is not None and reason.startswith("requested: ")
        if reason is not None and (requested or new != failed_at) and not await asyncio.to_thread(_lock_held, root):
            state = await _run_child(root, bundle, reason, test_lots, train_args, python, stop_grace_s)
            failed_at = None if state == "done" else new
        await asyncio.sleep(interval_s)


async def _run_child(root: Path, bundle: Path, reason: str, test_lots: Sequence[str], train_args: Sequence[str],
                     python: str, stop_grace_s: float) -> str | None:
    """One `run_retrain` in a child process; its final state (None: it ended without a status)."""
    retrain_dir(root).mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"root": str(root), "bundle": str(bundle), "reason": reason, "test_lots": list(test_lots),
                       "train_args": list(train_args)})
    with open(retrain_dir(root) / "watch.log", "ab") as log:
        log.write(f"{_now()} retraining: {reason}\n".encode())
        log.flush()
        proc = await asyncio.create_subprocess_exec(python, "-m", "sorterd.trainer.retrain", spec,
                                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                    start_new_session=True)
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            await _end_group(proc, stop_grace_s)
            raise
    status = await asyncio.to_thread(read_status, root)
    if code not in (0, EXIT_BUSY):
        _log.warning("retrain child exited %s (see %s)", code, retrain_dir(root) / "watch.log")
    return str(status.get("state")) if code == 0 else None


async def _end_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the child's process group (it and its `sorterd train`), then SIGKILL what is left."""
    _killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        pass
    _killpg(proc.pid, signal.SIGKILL)  # the group's members that outlived the grace (a busy train)
    await proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


def _child_main(argv: Sequence[str]) -> int:
    """``python -m sorterd.trainer.retrain SPEC``: one run for `watch` (SPEC: JSON root, bundle, reason, ...)."""
    spec = json.loads(argv[0])
    try:
        status = run_retrain(Path(spec["root"]), Path(spec["bundle"]), spec["reason"],
                             test_lots=spec["test_lots"], train_args=spec["train_args"])
    except RetrainBusy as exc:
        print(exc, file=sys.stderr)
        return EXIT_BUSY
    print(json.dumps({k: status.get(k) for k in ("state", "version", "candidate", "refused", "error")}), flush=True)
    return 0


def wait_for(root: Path, states: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Poll read_status until its state is one of ``states`` (for tools and tests); the last status."""
    deadline = time.monotonic() + timeout_s
    status = read_status(root)
    while status.get("state") not in states and time.monotonic() < deadline:
        time.sleep(0.2)
        status = read_status(root)
    return status


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
