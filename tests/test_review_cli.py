"""`sorterd review` and `sorterd trainer --review-port`: the page served on loopback, stopped by SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from sorterd.cli import main
from sorterd.link import keys
from tests.reviewdata import flagged_dataset

pytest.importorskip("aiohttp")
REPO = Path(__file__).resolve().parent.parent


def serve_and_ask(argv: list[str], banner: str) -> tuple[dict[str, object], int, str]:
    """Start `python -m sorterd ARGV`, wait for the banner's URL, GET /api/counts, SIGTERM it."""
    proc = subprocess.Popen([sys.executable, "-m", "sorterd", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(banner + r" (http://127\.0\.0\.1:\d+/)", line)
            if m:
                break
        else:
            raise AssertionError("no banner: " + "".join(lines))
        with urllib.request.urlopen(m.group(1) + "api/counts", timeout=30) as r:
            counts = json.loads(r.read())
        with urllib.request.urlopen(m.group(1), timeout=30) as r:
            assert b"sorterd review" in r.read()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        return counts, rc, "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_review_command_serves_the_dataset_on_loopback(tmp_path: Path) -> None:
    flagged_dataset(tmp_path, 3)
    counts, rc, _ = serve_and_ask(["review", "--data", str(tmp_path), "--port", "0"], "sorterd review:")
    assert counts["queue"] == 3 and rc == 128 + signal.SIGTERM


def test_trainer_serves_the_page_beside_the_link(tmp_path: Path) -> None:
    flagged_dataset(tmp_path / "data", 2)
    _, sec = keys.generate(tmp_path, "trainer")
    (tmp_path / "allowed").mkdir()
    argv = ["trainer", "--data", str(tmp_path / "data"), "--key", str(sec), "--allowed", str(tmp_path / "allowed"),
            "--bind", "tcp://127.0.0.1:*", "--review-port", "0"]
    counts, rc, err = serve_and_ask(argv, "sorterd trainer: review page on")
    assert counts["queue"] == 2 and rc == 128 + signal.SIGTERM, err


def test_review_command_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["review", "--data", str(tmp_path), "--port", "70000"])
    assert "a port number in [0, 65535]" in capsys.readouterr().err
