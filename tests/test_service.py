"""systemd/sorterd.service: refusals are not restarted, a stop fits the drain, the operator sees why."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, write_toml

from sorterd.cli import REFUSALS, main
from sorterd.cli.run import STOP_DRAIN_S

UNIT = REPO / "systemd" / "sorterd.service"


def _service_settings() -> dict[str, str]:
    section, out = "", {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _seconds(value: str) -> float:
    assert value.endswith("s") and value[:-1].isdigit(), f"write it in seconds, e.g. 20s, not {value!r}"
    return float(value[:-1])


def test_refusals_are_not_restarted_and_a_missing_device_is() -> None:
    s = _service_settings()
    assert s["Restart"] == "on-failure"
    prevented = {int(c) for c in s["RestartPreventExitStatus"].split()}
    assert prevented == set(REFUSALS)
    assert 4 not in prevented  # cannot run the machine: a device missing or busy may come back


def test_a_signal_stop_is_clean_and_fits_the_drain() -> None:
    s = _service_settings()
    assert s["KillSignal"] == "SIGTERM"
    assert {128 + signal.SIGTERM, 128 + signal.SIGINT} <= {int(c) for c in s["SuccessExitStatus"].split()}
    # The drain, then the valves off and the last commit: systemd must not SIGKILL in between.
    assert _seconds(s["TimeoutStopSec"]) >= STOP_DRAIN_S + 10
    assert f"at most {STOP_DRAIN_S:.0f} s" in UNIT.read_text()  # the unit says what the drain is


def test_a_refusal_tells_systemd_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        code = main(["run", "--config", str(write_toml(tmp_path, "[machine]\nname = 1\n"))])
        assert code == 2
        status = sock.recv(4096).decode()
    assert status.startswith("STATUS=not sorting: the config is invalid (exit 2")
    assert "not restarted" in status
    # The journal's last line says the same (systemctl status shows the last lines).
    assert capsys.readouterr().err.strip().splitlines()[-1] == "sorterd: " + status.removeprefix("STATUS=")


def test_no_status_line_outside_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert main(["run", "--config", str(write_toml(tmp_path, "[machine]\nname = 1\n"))]) == 2
    assert "not sorting" not in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here "
                    "(apt-get install systemd); the unit's settings are still checked above")
def test_the_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this interpreter instead of /opt/sorterd.
    unit = tmp_path / "sorterd.service"
    text = UNIT.read_text()
    assert "/opt/sorterd/.venv/bin/sorterd" in text
    unit.write_text(text.replace("/opt/sorterd/.venv/bin/sorterd", shutil.which("true") or "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "sorterd.service" in ln]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr
