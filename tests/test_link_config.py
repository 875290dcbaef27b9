"""[link]: refusals name link.key, the value and what is allowed; a bad outbox folder stops
`sorterd run` (exit 2) before anything runs; a link-enabled run with no trainer still sorts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sorterd.cli import main
from sorterd.cli.compose import load_config
from sorterd.cli.run import RunResult
from sorterd.config import link_sorter_id
from tests.conftest import problems_of, write_toml

KEYS = 'trainer_key = "t.key"\nsecret_key = "s.key_secret"\n'


def test_defaults_are_the_agreed_ones(tmp_path: Path) -> None:
    link = load_config(write_toml(tmp_path, "")).link
    assert (link.enabled, link.sorter_id, link.trainer, link.trainer_key, link.secret_key) == (
        False, "", "tcp://127.0.0.1:5591", "", "")
    assert (link.outbox_dir, link.outbox_quota_mb, link.drift_every, link.send_window) == ("outbox", 2000.0, 0, 16)
    assert (link.heartbeat_s, link.ack_timeout_s, link.reconnect_max_s) == (1.0, 10.0, 30.0)


def test_enabled_without_keys_names_both_keys(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[link]\nenabled = true\n")
    assert "link.enabled = true needs link.trainer_key and link.secret_key" in msg


def test_enabled_with_one_key_names_the_other(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[link]\nenabled = true\ntrainer_key = "t.key"\n')
    assert "link.enabled = true needs link.secret_key:" in msg


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".hidden", "with space", "x" * 65, "-dash"])
def test_sorter_id_must_be_file_name_safe(tmp_path: Path, bad: str) -> None:
    [msg] = problems_of(tmp_path, f'[link]\nsorter_id = "{bad}"\n')
    assert msg.startswith(f"link.sorter_id = {bad!r} is not file-name-safe: use letters, digits")


def test_machine_name_stands_in_for_an_empty_sorter_id_and_must_be_safe_then(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, f'[machine]\nname = "sorter 1"\n[link]\nenabled = true\n{KEYS}')
    assert "machine.name = 'sorter 1'" in msg and "set link.sorter_id" in msg
    cfg = load_config(write_toml(tmp_path, f'[machine]\nname = "sorter 1"\n[link]\nenabled = true\nsorter_id = "s1"\n{KEYS}'))
    assert link_sorter_id(cfg) == "s1"
    cfg = load_config(write_toml(tmp_path, f'[machine]\nname = "sorter-7"\n[link]\nenabled = true\n{KEYS}'))
    assert link_sorter_id(cfg) == "sorter-7"


@pytest.mark.parametrize(("text", "start"), [
    ("outbox_quota_mb = 0.5", "link.outbox_quota_mb = 0.5 is too small: must be >= 1.0"),
    ("drift_every = -1", "link.drift_every = -1 is too small: must be >= 0"),
    ("send_window = 0", "link.send_window = 0 is too small: must be >= 1"),
    ("heartbeat_s = 0", "link.heartbeat_s = 0.0 must be > 0.0"),
    ('trainer = "localhost:5591"', "link.trainer = 'localhost:5591': give a ZeroMQ endpoint"),
])
def test_bounds_name_key_value_and_range(tmp_path: Path, text: str, start: str) -> None:
    [msg] = problems_of(tmp_path, f"[link]\n{text}\n")
    assert msg.startswith(start), msg


def test_an_outbox_dir_that_is_a_file_stops_the_run_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[Any] = []

    def fake_run(*a: Any, **k: Any) -> RunResult:
        calls.append(a)
        return RunResult({"record": {"lost": {"rows": 0, "unseen": 0, "decisions": 0}}}, Path("."))

    monkeypatch.setattr("sorterd.cli.run.run", fake_run)
    (tmp_path / "box").write_text("x")
    cfg = write_toml(tmp_path, f'[record]\nlog_dir = "{tmp_path / "logs"}"\n[metrics]\nenabled = false\n'
                               f'[link]\nenabled = true\n{KEYS}outbox_dir = "{tmp_path / "box"}"\n')
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    assert f"link.outbox_dir {str(tmp_path / 'box')!r}: exists and is not a directory" in capsys.readouterr().err
    assert calls == []
