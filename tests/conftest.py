from __future__ import annotations

from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.configfile import ConfigError

REPO = Path(__file__).resolve().parent.parent


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
