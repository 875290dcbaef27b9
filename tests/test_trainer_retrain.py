"""`sorterd trainer --retrain-model`: one process serves the link, the page and the §5.4 schedule.

The page's "retrain now" (POST /api/retrain) is taken by the trainer's watcher, which runs the
retrain in a child process: the page keeps answering while it trains, and stopping the trainer
ends the run (and its `sorterd train`) so the status reads "interrupted", never "done".  A whole
run to "done" through the trainer is in tests/test_loop_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sorterd.cli import main
from sorterd.link import keys
from sorterd.trainer import retrain as rt

pytest.importorskip("aiohttp")
REPO = Path(__file__).resolve().parent.parent


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def start_trainer(argv: list[str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`python -m sorterd trainer ARGV` until its review banner; (process, page URL, stderr lines so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "sorterd", "trainer", *argv], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"review page on (http://127\.0\.0\.1:\d+)/", line)
        if m:
            return proc, m.group(1), lines
    proc.wait(10)
    raise AssertionError("the trainer did not start: " + "".join(lines))


def processes_naming(text: str) -> list[int]:
    """Live processes (not zombies) whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(entry.name))
    return found


def trainer_argv(tmp_path: Path, data: Path) -> list[str]:
    _, sec = keys.generate(tmp_path / "keys", "trainer")
    (tmp_path / "allowed").mkdir(exist_ok=True)
    return ["--data", str(data), "--key", str(sec), "--allowed", str(tmp_path / "allowed"),
            "--bind", "tcp://127.0.0.1:*", "--review-port", "0"]


def test_the_pages_retrain_now_runs_in_the_trainer_and_stopping_it_interrupts_the_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["sim", "generate", "--out", str(data), "--stones", "16", "--lot", "thai-mixed",
                 "--lot-id", "LOT-W1", "--seed", "3"]) == 0
    bundle = tmp_path / "current"
    shutil.copytree(REPO / "models" / "default", bundle)
    slow = "--epochs-heads 1 --epochs 500 --batch-size 4 --threads 1"  # long: it is stopped while training
    proc, url, _ = start_trainer([*trainer_argv(tmp_path, data), "--retrain-model", str(bundle),
                                  "--retrain-every", "1", "--retrain-train-args", slow])
    try:
        assert http(url + "/api/retrain")[1]["state"] == "idle"
        code, answer = http(url + "/api/retrain", {"reason": "operator asked"})
        assert code == 202 and answer["requested"]
        deadline = time.monotonic() + 120
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = http(url + "/api/retrain")[1]
            if status["state"] == "training" and "request" not in status:
                break
            assert status["state"] in ("idle", "training"), status
            time.sleep(0.5)
        assert status["state"] == "training" and status["reason"] == "requested: operator asked", status
        assert status["new_labels"] == sum(1 for x in (data / "labels.jsonl").read_text().splitlines()
                                           if json.loads(x)["color"] is not None)
        assert processes_naming(str(bundle)), "no retrain child runs"
        assert http(url + "/api/counts")[0] == 200  # the page answers while the model trains
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = rt.read_status(data)
    assert status["state"] == "interrupted" and status["interrupted_in"] == "training", status
    deadline = time.monotonic() + 10
    while processes_naming(str(bundle)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_naming(str(bundle)) == [], "a retrain process outlived the trainer"
    assert "retraining: requested: operator asked" in (data / "retrain" / "watch.log").read_text()


@pytest.mark.parametrize(("extra", "says"), [
    (["--retrain-model", "nowhere"], "--retrain-model nowhere: not a model bundle"),
    (["--retrain-model", str(REPO / "models" / "default"), "--retrain-every", "0"],
     "--retrain-every 0: seconds in [1, 86400]"),
    (["--retrain-model", str(REPO / "models" / "default"), "--retrain-train-args", "'open"],
     "--retrain-train-args \"'open\": not a shell-quoted string"),
])
def test_bad_retrain_options_are_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert main(["trainer", *trainer_argv(tmp_path, data), *extra]) == 2
    assert says in capsys.readouterr().err
    assert not (data / "inbox").exists() and not (data / "retrain").exists()  # nothing opened


def test_a_failed_run_is_not_retried_until_more_labels_come(tmp_path: Path) -> None:
    """The watcher's own loop (no trainer around it): batch trigger 2; the bundle cannot be trained from,
    so the run fails; the same count never starts another run, one more label does."""
    import asyncio

    data = tmp_path / "ds"
    data.mkdir()
    line = '{{"stone_id": "S{}", "color": "blue", "clarity": "opaque", "lot_id": "L1"}}\n'
    (data / "labels.jsonl").write_text(line.format(1) + line.format(2))
    bundle = tmp_path / "broken"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"version": "v002", "created": "2026-01-01T00:00:00Z"}))
    log = data / "retrain" / "watch.log"

    def runs() -> int:
        return log.read_text().count("retraining: ") if log.exists() else 0

    async def scenario() -> tuple[int, int, str]:
        task = asyncio.create_task(rt.watch(data, bundle, rt.RetrainPolicy(batch=2), interval_s=0.2))
        try:
            async def until(cond: Any, timeout_s: float) -> None:
                deadline = time.monotonic() + timeout_s
                while not cond() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)

            await until(lambda: rt.read_status(data).get("state") == "failed", 120)
            state = str(rt.read_status(data).get("state"))
            await asyncio.sleep(3.0)  # 15 checks at 0.2 s: the same count, no new run
            before = runs()
            with open(data / "labels.jsonl", "a") as fh:
                fh.write(line.format(3))
            await until(lambda: rt.read_status(data).get("new_labels") == 3
                        and rt.read_status(data).get("state") == "failed", 120)
            return before, runs(), state
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    before, after, state = asyncio.run(scenario())
    assert state == "failed" and "sorterd train exited" in rt.read_status(data)["error"]
    assert (before, after) == (1, 2)
    assert rt.read_status(data)["new_labels"] == 3
