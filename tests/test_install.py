"""`pip install .` (a wheel, not an editable install) gives a working sorter from any directory.

The wheel is built from a copy of the checkout and installed into a fresh venv.  So that the test
downloads nothing, the fresh venv sees this venv's third-party packages through a .pth line --
but not this checkout's sorterd: the editable install's finder lives in a .pth file of this venv's
site-packages, which a path added by another .pth is not scanned for, and PYTHONPATH is dropped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_NOT_SOURCES = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")
_ROOT_ONLY = {".venv", "venv", "build", "dist", "production_logs", "data", "runs"}  # .gitignore's root entries


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = set(_NOT_SOURCES(directory, names))
    if Path(directory) == REPO:
        skip |= _ROOT_ONLY & set(names)
    return skip


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _can_build_wheels_here() -> bool:
    """setuptools >= 70.1 has bdist_wheel itself; older ones need the `wheel` package."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv's bin/, an environment without this checkout) after installing the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SORTERD_MODELS", "SORTERD_FIRMWARE_SRC",
                                                            "VIRTUAL_ENV", "PYTHONHOME")}
    dist = tmp / "dist"
    # Like `python -m build`: the sdist first, the wheel from the unpacked sdist (so MANIFEST.in
    # must carry what setup.py copies into the wheel).
    sdist = _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"],
                 src, env)
    assert sdist.returncode == 0, sdist.stderr
    tarballs = list(dist.glob("sorterd-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    with tarfile.open(tarballs[0]) as tar:
        # Our own tarball; the "data" filter where this Python has it (3.11.4+, and backports).
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = next((tmp / "unpacked").iterdir())
    # Offline with this venv's setuptools when it can build wheels itself; else pip's isolated build.
    isolation = [] if _can_build_wheels_here() else ["--use-pep517"]
    no_isolation = ["--no-build-isolation"] if not isolation else []
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, *isolation, "-q", "-w", str(dist),
                  str(unpacked)], tmp, env)
    assert built.returncode == 0, built.stderr
    wheels = list(dist.glob("sorterd-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    inst = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                 str(wheels[0])], tmp, env)
    assert inst.returncode == 0, inst.stderr
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp, env).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "zz_outer_deps.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    return venv / "bin", env


@pytest.mark.slow
def test_the_wheel_carries_the_model_configs_and_firmware_but_not_the_trainer_weights(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    whl = next((Path(installed[0]).parent.parent / "dist").glob("sorterd-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    for want in ("sorterd/_bundled/models/default/model.onnx", "sorterd/_bundled/models/default/manifest.json",
                 "sorterd/configs/sim.toml", "sorterd/configs/machine.toml",
                 "sorterd/_bundled/firmware/host/Makefile", "sorterd/_bundled/firmware/core/vc_core.c",
                 "sorterd/_bundled/firmware/test/test_core.c"):
        assert want in names, want
    assert not [n for n in names if n.endswith("weights.pt")]


@pytest.mark.slow
def test_the_sdist_carries_the_trainer_weights_and_the_firmware(installed: tuple[Path, dict[str, str]]) -> None:
    tarball = next((Path(installed[0]).parent.parent / "dist").glob("sorterd-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for want in ("models/default/weights.pt", "models/default/model.onnx", "models/default/manifest.json",
                 "hw/firmware/host/Makefile", "hw/firmware/core/vc_core.c", "hw/PROTOCOL.md", "setup.py"):
        assert want in names, want


@pytest.mark.slow
def test_an_installed_sorter_runs_the_simulated_machine_from_any_directory(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    where = _run([str(bin_dir / "python"), "-c",
                  "import sorterd, sorterd.data.bundle as b, sorterd.sim.firmware as f; "
                  "print(sorterd.__file__); print(b.default_bundle()); print(f.firmware_source())"], tmp_path, env)
    assert where.returncode == 0, where.stderr
    module, bundle, firmware = (Path(line) for line in where.stdout.split())
    venv = bin_dir.parent
    assert module.is_relative_to(venv) and not module.is_relative_to(REPO)
    assert bundle == module.parent / "_bundled" / "models" / "default"
    assert firmware == module.parent / "_bundled" / "firmware"

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    r = _run([str(bin_dir / "sorterd"), "run", "--sim", "--stones", "50", "--no-progress", "--json", "out.json"],
             run_dir, env)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run_dir / "out.json").read_text())
    shipped = json.loads((REPO / "models" / "default" / "manifest.json").read_text())
    assert summary["stones_fed"] == 50
    assert summary["stones_seen"] > 0 and sum(summary["decided"].values()) == summary["objects_decided"]
    assert summary["model"]["version"] == shipped["version"]
    assert (run_dir / summary["batch_dir"] / "stones.db").is_file()


@pytest.mark.slow
def test_sorterd_models_overrides_the_bundled_default(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    sim_toml = _run([str(bin_dir / "python"), "-c", "from sorterd.config import sim_config_path as p; print(p())"],
                    tmp_path, env).stdout.strip()
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "default", models / "default",
                    ignore=shutil.ignore_patterns("weights.pt"))
    ok = _run([str(bin_dir / "sorterd"), "check-config", sim_toml], tmp_path, {**env, "SORTERD_MODELS": str(models)})
    assert ok.returncode == 0, ok.stderr
    assert f"at {models / 'default'}" in ok.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _run([str(bin_dir / "sorterd"), "check-config", sim_toml], tmp_path, {**env, "SORTERD_MODELS": str(empty)})
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert str(empty / "default") in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.host_build(rebuild=True)
def test_an_installed_sorter_builds_and_runs_the_firmware_host_build_from_its_bundled_sources(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    cache = tmp_path / "cache"  # a fresh cache: the binary is built here, from the wheel's copy
    r = _run([str(bin_dir / "sorterd"), "run", "--sim", "--valves", "mcu", "--stones", "20", "--no-progress",
              "--json", "out.json"], tmp_path, {**env, "SORTERD_CACHE": str(cache)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list(cache.glob("sorterd/firmware/*/vc-host"))
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["stones_fed"] == 20 and summary["fire_error_us"]["n"] > 0
