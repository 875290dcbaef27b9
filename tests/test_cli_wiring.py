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
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'aiohttp')\n"
            "               or m.startswith('sorterd.train'))\n"
            "print(','.join(heavy))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_every_subcommand_is_wired() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"run", "check-config", "calibrate", "sim", "train", "evaluate", "compare", "models", "keys", "trainer",
                                "retrain", "review"}
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


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import sorterd

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"sorterd {sorterd.__version__}"


def test_help_points_to_the_domain_reference_and_it_exists() -> None:
    text = build_parser().format_help()
    assert "docs/domain.md" in text and "docs/config.md" in text
    assert (REPO / "docs" / "domain.md").is_file()


def sorterd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # A subprocess: `sorterd run` imports cli/run.py, whose default output stream is bound at import.
    code = "import sys; from sorterd.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_bad_value_from_a_flag_names_the_flag_not_the_config_file() -> None:
    res = sorterd_cli("run", "--sim", "--rate", "1000", "--metrics-port", "70000")
    assert res.returncode == 2, res.stderr
    assert "sim.toml" not in res.stderr and "configuration error in the command line:" in res.stderr
    assert "  - --rate: sim.rate_per_s = 1000.0 is too large: must be <= 500.0" in res.stderr
    assert "  - --metrics-port: metrics.port = 70000 is too large" in res.stderr


def test_a_bad_value_in_the_file_still_names_the_file(tmp_path: Path) -> None:
    from sorterd import config

    bad = tmp_path / "bad.toml"
    bad.write_text(config.sim_config_path().read_text() + "\n[pipeline]\nworkers = 0\n")
    res = sorterd_cli("run", "--config", str(bad), "--rate", "1000")
    assert res.returncode == 2, res.stderr
    assert f"configuration error in {bad} and the command line:" in res.stderr
    assert "  - pipeline.workers = 0" in res.stderr and "  - --rate: sim.rate_per_s = 1000.0" in res.stderr
