from __future__ import annotations

import os
from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.configfile import ConfigError
from sorterd.sim.firmware import host_build_unavailable

REPO = Path(__file__).resolve().parent.parent
REQUIRE_HOST_BUILD = "SORTERD_REQUIRE_HOST_BUILD"  # set (CI): a test that needs the host build fails instead


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `host_build` need the valve-controller firmware's host build (`make` and a C
    compiler, unless it is already built in the cache): without them they are skipped, saying which
    tool is missing -- or fail, where SORTERD_REQUIRE_HOST_BUILD says the tools must be there."""
    marker = item.get_closest_marker("host_build")
    if marker is None:
        return
    why = host_build_unavailable(rebuild=bool(marker.kwargs.get("rebuild", False)))
    if why is None:
        return
    if os.environ.get(REQUIRE_HOST_BUILD):
        pytest.fail(f"{REQUIRE_HOST_BUILD} is set, but {why}", pytrace=False)
    pytest.skip(f"needs the firmware's host build: {why}")


@pytest.fixture
def sim_cfg() -> config.Config:
    return load_config(config.sim_config_path())


def write_toml(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems_of(tmp_path: Path, text: str) -> list[str]:
    """The problems a config file's refusal lists."""
    with pytest.raises(ConfigError) as exc:
        load_config(write_toml(tmp_path, text))
    return exc.value.problems
