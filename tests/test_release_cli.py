"""`sorterd keys generate --kind release`, `sorterd models sign|verify|stage|activate|rollback|pin|list`:
the command line runs the sorter's own checks (verify_release) and exits non-zero naming the first
that failed."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sorterd.cli import main
from tests.release_fakes import DEFAULT


def test_generate_sign_verify_stage_activate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "generate", "--kind", "release", "--name", "trainer", "--dir", str(keys)]) == 0
    pub, sec = keys / "trainer.release.pub", keys / "trainer.release.key"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    r7 = tmp_path / "r7"
    assert main(["models", "sign", str(DEFAULT), "--key", str(sec), "--release", "7", "--out", str(r7)]) == 0
    assert main(["models", "verify", str(r7), "--trusted", str(pub)]) == 0
    assert "every check passed" in capsys.readouterr().out

    cfg = tmp_path / "sorter.toml"
    # The reference kit's part of the gate: tests/test_release_kit.py.
    cfg.write_text(f'[models]\ndir = "state"\ntrusted_keys = ["{pub}"]\nrequire_kit = false\n')
    assert main(["models", "stage", str(r7), "--config", str(cfg)]) == 0
    assert main(["models", "activate", "7", "--config", str(cfg)]) == 0
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert (state["active"], state["highest_accepted"]) == (7, 7)
    capsys.readouterr()
    # The floor of --config applies to verify as well: the same release is not newer.
    assert main(["models", "verify", str(r7), "--config", str(cfg)]) == 1
    assert "refused: downgrade: " in capsys.readouterr().err
    assert main(["models", "rollback", "--config", str(cfg)]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    m = json.loads((r7 / "manifest.json").read_text())
    m["trainer"] = "someone else"
    (r7 / "manifest.json").write_text(json.dumps(m))
    assert main(["models", "verify", str(r7), "--trusted", str(pub)]) == 1
    assert "refused: signature: " in capsys.readouterr().err


def test_verify_without_a_trusted_key_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify", str(DEFAULT)]) == 2
    assert "no trusted key" in capsys.readouterr().err


def test_sign_refuses_a_readable_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", "--kind", "release", "--name", "t", "--dir", str(tmp_path)]) == 0
    (tmp_path / "t.release.key").chmod(0o644)
    assert main(["models", "sign", str(DEFAULT), "--key", str(tmp_path / "t.release.key"), "--release", "1",
                 "--out", str(tmp_path / "r1")]) == 2
    assert "lets others read a secret key" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()
