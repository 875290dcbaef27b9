"""How the `sorterd` command line is put together: plain imports, nothing heavy at import time."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sorterd.cli import build_parser
from sorterd.cli.args import fault, positive_float, positive_int

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_cli_and_building_its_parser_imports_no_torch() -> None:
    # `sorterd run` on a sorter must not pay for (or need) the trainer's torch.
    code = ("import sys\n"
            "import sorterd.cli\n"
            "sorterd.cli.build_parser()\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib')\n"
            "               or m.startswith('sorterd.train'))\n"
            "print(','.join(heavy))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_every_subcommand_is_wired() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"run", "check-config", "calibrate", "sim", "train", "evaluate", "compare"}
    assert build_parser().parse_args(["calibrate", "--sim", "--sim-fault", "backlight=-0.08"]).sim_fault == [
        ("backlight", -0.08)]


@pytest.mark.parametrize(("parse", "text", "message"), [
    (positive_int, "0", "'0': must be a positive integer"),
    (positive_int, "-3", "'-3': must be a positive integer"),
    (positive_float, "0", "'0': must be a positive number"),
    (positive_float, "nan", "'nan': must be a positive number"),
    (fault, "backlight", "'backlight': expected NAME=NUMBER, e.g. backlight=-0.08"),
    (fault, "scale=big", "'scale=big': expected NAME=NUMBER, e.g. backlight=-0.08"),
])
def test_argument_types_say_what_is_allowed(parse: Callable[[str], object], text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$"):
        parse(text)


def test_argument_types_accept_what_they_allow() -> None:
    assert (positive_int("7"), positive_float("2.5"), fault(" scale = 0.1")) == (7, 2.5, ("scale", 0.1))
