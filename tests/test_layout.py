"""Where code lives: simulator knowledge stays in sorterd.sim and the composition root (sorterd.cli),
and nothing below the composition root imports it (dependencies point from cli/ inwards)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sorterd

# Every package of the real sorter (and the trainer), imported module by module.
REAL_PACKAGES = ("sorterd.sorting", "sorterd.parts", "sorterd.controller", "sorterd.calibration",
                 "sorterd.data", "sorterd.train", "sorterd.trainer")
REAL_MODULES = ("sorterd.config", "sorterd.configfile", "sorterd.metrics", "sorterd.domain", "sorterd.clock",
                "sorterd.quantiles")

# Imports every named module, then prints which modules of the given packages ended up loaded.
PROBE = """
import importlib, json, sys
watched, names = sys.argv[1].split(","), sys.argv[2:]
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if any(m == w or m.startswith(w + ".") for w in watched))))
"""


def modules_of(package: str) -> list[str]:
    """The package and every module below it, found on disk (so a new module is checked too)."""
    root = Path(sorterd.__file__).parent.joinpath(*package.split(".")[1:])
    return [package] + [m.name for m in pkgutil.walk_packages([str(root)], prefix=package + ".")]


def sim_modules_loaded_by(modules: list[str], watched: str = "sorterd.sim") -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, watched, *modules], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"importing {modules} failed:\n{done.stderr}"
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_every_real_package_is_walked() -> None:
    # A walk that found nothing would make the test below pass vacuously.
    assert "sorterd.sorting.summary" in modules_of("sorterd.sorting")
    assert "sorterd.parts.valves.dry" in modules_of("sorterd.parts")
    assert "sorterd.calibration.checklist" in modules_of("sorterd.calibration")


def test_the_probe_sees_a_simulator_import() -> None:
    assert "sorterd.sim.world" in sim_modules_loaded_by(["sorterd.sim.world"])


@pytest.mark.parametrize("package", REAL_PACKAGES + REAL_MODULES)
def test_real_packages_import_no_simulator(package: str) -> None:
    """A fresh interpreter per package: importing all of it loads no sorterd.sim module."""
    modules = modules_of(package) if package in REAL_PACKAGES else [package]
    assert sim_modules_loaded_by(modules) == [], f"{package} imports the simulator"


@pytest.mark.parametrize("package", REAL_PACKAGES + REAL_MODULES)
def test_real_packages_do_not_reach_into_the_composition_root(package: str) -> None:
    """The stages, parts and calibration are handed what they need (parts, rigs, openers) by
    sorterd.cli; none of them imports it."""
    modules = modules_of(package) if package in REAL_PACKAGES else [package]
    assert sim_modules_loaded_by(modules, "sorterd.cli") == [], f"{package} imports the composition root"
