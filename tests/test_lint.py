"""The standing checks, run by the test command so CI fails when they fail:
`ruff check sorterd tests` and `mypy sorterd` must both be clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def _tool(module: str) -> None:
    if shutil.which(module) is None and _run(module, "--version").returncode != 0:
        pytest.fail(f"{module} is not installed: it is part of the test extra (pip install -e '.[test]')")


def test_ruff_is_clean() -> None:
    _tool("ruff")
    r = _run("ruff", "check", "sorterd", "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean() -> None:
    _tool("mypy")
    r = _run("mypy", "sorterd")
    assert r.returncode == 0, r.stdout + r.stderr
