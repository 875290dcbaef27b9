"""Issue 11's first Done-when, end to end in real processes: a flagged batch from the simulated
sorter arrives over the link (CurveZMQ) in the trainer's §7.1 dataset, is labelled in a headless
browser by keys only, and the page's "retrain now" makes the same trainer process run `sorterd
train --from` (the §5.4 watcher, `--retrain-model`): the new model's §5.5 log entry counts exactly
the labels given in the browser.

    sorterd keys generate x2 -> sorterd trainer --data DIR ... --review-port 0 --retrain-model BUNDLE
    sorterd run --config sim.toml+[link] --stones N --link-drain 30 -> chromium types the labels
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sorterd import config
from sorterd.cli import main
from tests.test_review_browser import ARGS, CHROMIUM, _need_browser
from tests.test_trainer_retrain import http, start_trainer

# A stone on the page: its id (the page also says "–" before it starts and "enter your name first"
# or "no stones to label": none of them a stone to read).
STONE_SHOWN = re.compile(r"S\d{6}")

REPO = Path(__file__).resolve().parent.parent
TINY = "--epochs-heads 1 --epochs 1 --batch-size 8 --threads 1"  # as test_retrain's tiny run
SORTER = "sim-1"  # the sim config's machine.name: the sorter id the trainer knows the key under


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sorter_config(tmp_path: Path, endpoint: str, keys: Path) -> Path:
    """The shipped sim config, more stones flagged (sort_confidence 0.99), and the link on."""
    text = config.sim_config_path().read_text()
    for old, new in (("sort_confidence = 0.80", "sort_confidence = 0.99"),
                     ('log_dir = "production_logs"', f'log_dir = "{tmp_path / "logs"}"'),
                     ("[metrics]\nenabled = true", "[metrics]\nenabled = false")):
        assert old in text, old
        text = text.replace(old, new)
    text += (f'\n[link]\nenabled = true\ntrainer = "{endpoint}"\ntrainer_key = "{keys / "trainer.key"}"\n'
             f'secret_key = "{keys / (SORTER + ".key_secret")}"\noutbox_dir = "{tmp_path / "outbox"}"\n')
    path = tmp_path / "sorter.toml"
    path.write_text(text)
    return path


def wait_status(url: str, states: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = http(url + "/api/retrain")[1]
        if status.get("state") in states and "request" not in status:
            return status
        time.sleep(1.0)
    raise AssertionError(f"retrain state {status.get('state')!r} after {timeout_s:.0f} s: {status}")


@pytest.mark.slow
def test_flagged_batch_over_the_link_labelled_in_the_browser_then_retrained(tmp_path: Path) -> None:
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    keys, allowed, data = tmp_path / "keys", tmp_path / "allowed", tmp_path / "data"
    for name in ("trainer", SORTER):
        assert main(["keys", "generate", "--name", name, "--dir", str(keys)]) == 0
    allowed.mkdir()
    shutil.copy(keys / f"{SORTER}.key", allowed / f"{SORTER}.key")
    bundle = tmp_path / "current"
    shutil.copytree(REPO / "models" / "default", bundle)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    trainer, url, _ = start_trainer(["--data", str(data), "--key", str(keys / "trainer.key_secret"),
                                     "--allowed", str(allowed), "--bind", endpoint, "--review-port", "0",
                                     "--retrain-model", str(bundle), "--retrain-every", "1",
                                     "--retrain-train-args", TINY])
    try:
        # 1. The sorter sorts a simulated batch and sends what it flagged over the link.
        cfg = sorter_config(tmp_path, endpoint, keys)
        run = subprocess.run([sys.executable, "-m", "sorterd", "run", "--config", str(cfg), "--stones", "60",
                              "--link-drain", "30", "--json", str(tmp_path / "summary.json")],
                             cwd=REPO, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        link = summary["link"]
        assert summary["flagged"] >= 10 and link["delivered"] == link["queued"] == summary["flagged"] + 1, link
        queue = [json.loads(x) for x in (data / "unlabelled.jsonl").read_text().splitlines()]  # + 1: the session
        assert len(queue) == summary["flagged"] and {q["sorter_id"] for q in queue} == {SORTER}
        assert all(q["reason"] == "flagged" for q in queue)
        assert http(url + "/api/counts")[1]["queue"] == len(queue)

        # 2. Every flagged stone labelled in the browser, by keys only (1/2/3 colour, q/w/e clarity).
        shown: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            page.fill("#annotator", "duke")
            page.press("#annotator", "Enter")
            for i in range(len(queue)):
                expect(page.locator("#stone-id")).to_have_text(STONE_SHOWN, timeout=15_000)
                sid = page.locator("#stone-id").inner_text()
                assert sid not in shown
                shown.append(sid)
                page.keyboard.press("123"[i % 3])
                page.keyboard.press("qwe"[(i // 3) % 3])
                expect(page.locator("#stone-id")).not_to_have_text(sid, timeout=15_000)
            expect(page.locator("#queue-length")).to_contain_text(f"labelled {len(queue)}", timeout=15_000)
            # 3. The page's "retrain now": the trainer's watcher runs sorterd train --from the current model.
            page.click("#retrain-now")
            expect(page.locator("#status")).to_contain_text("retraining requested", timeout=15_000)
            browser.close()
        labels = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines()]
        assert sorted(x["stone_id"] for x in labels) == sorted(q["stone_id"] for q in queue) == sorted(shown)
        assert all(x["annotator"] == "duke" and x["color"] and x["clarity"] for x in labels)
        status = wait_status(url, ("done", "failed", "interrupted"), 200)
    finally:
        trainer.terminate()
        trainer.wait(60)
    assert status["state"] == "done", status.get("error") or status
    assert status["reason"] == "requested: requested on the review page by duke"
    entry = status["log_entry"]
    assert entry["new_samples_since_last"] == len(labels) == status["new_labels"]  # §5.5: exactly those labels
    log = [json.loads(x) for x in (data / "models" / "model_log.jsonl").read_text().splitlines()]
    shipped = json.loads((REPO / "models" / "default" / "manifest.json").read_text())["version"]
    after = f"v{int(shipped[1:]) + 1:03d}"  # fine-tuned from the shipped model: the next version
    assert log[-1] == entry and entry["version"] == after
    assert re.fullmatch(r"run-\d{8}T\d{6}", status["run"]) and status["bundle"] == str(data.resolve() / "models" / status["run"])
    manifest = json.loads((Path(status["bundle"]) / "manifest.json").read_text())
    assert manifest["version"] == after and (Path(status["bundle"]) / "model.onnx").is_file()
