"""Valve backend configuration: strict, and every refusal names section.key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli import _overrides, build_parser
from tests.conftest import problems_of


def test_mcu_defaults_are_valid_for_the_simulated_machine() -> None:
    cfg = config.load(config.sim_config_path(), {"valves": {"type": "mcu"}})
    v = cfg.valves
    assert (v.type, v.port, v.silence_ms, v.max_on_ms) == ("mcu", "sim", 200.0, 40.0)
    assert v.silence_ms <= 250  # the fail-safe window the issue asks for, by default
    assert not cfg.offline  # so the run uses the wall clock: the firmware is real time


def test_options_of_one_backend_are_refused_by_another(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[valves]\ntype = "sim"\nport = "/dev/ttyACM0"\n')
    assert msg.startswith("valves.port: unknown option; valid options of [valves] are: command_latency_ms, type")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "gpiod"\nnumbering = "BCM"\n')
    assert "valves.numbering: unknown option" in msg and "chip" in msg


def test_pins_need_every_bin_once(tmp_path: Path) -> None:
    probs = problems_of(tmp_path, '[valves]\ntype = "mcu"\npins = { CUT = 2, SELECT = 2 }\n')
    assert "valves.pins = {'CUT': 2, 'SELECT': 2}: needs exactly the keys CUT, SELECT, FLIP" in probs
    assert "valves.pins = {'CUT': 2, 'SELECT': 2}: every output needs its own pin" in probs
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\npins = { CUT = 2, SELECT = 3, FLIP = 300 }\n')
    assert msg == "valves.pins.FLIP = 300: must be an integer in [0, 255]"


def test_watchdog_heartbeat_and_link_timing_must_fit_together(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nheartbeat_ms = 100.0\n')
    assert msg == ("valves.heartbeat_ms = 100.0 must be at most a third of valves.silence_ms = 200.0 "
                   "(one lost heartbeat must not trip the watchdog)")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nsilence_ms = 300.0\nsilence_ms_x = 1\n')
    assert msg.startswith("valves.silence_ms_x: unknown option")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nsync_interval_ms = 200.0\n')
    assert msg.startswith("valves.link_timeout_ms = 300.0 must be at least three times valves.sync_interval_ms = 200.0")


def test_controller_limits_must_cover_the_ejection_plan(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nmax_on_ms = 20.0\n')
    assert msg == ("valves.max_on_ms = 20.0 is below ejection.max_pulse_ms = 25.0: every long pulse would be cut; "
                   "raise valves.max_on_ms")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "gpiod"\nlate_limit_us = 1500.0\n')
    assert msg.startswith("valves.late_limit_us = 1500.0 is above ejection.margin_ms = 1.0 ms")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nsilence_ms = 5.0\n')
    assert msg == "valves.silence_ms = 5.0 is too small: must be >= 10.0 (allowed range 10.0 .. 5000.0)"


def test_the_firmware_host_build_needs_the_simulated_machine(tmp_path: Path) -> None:
    text = '[camera]\ntype = "replay"\nsession = "/s"\n[trigger]\ntype = "replay"\n[valves]\ntype = "mcu"\n'
    [msg] = problems_of(tmp_path, text)
    assert msg.startswith("valves.port = 'sim' runs the firmware's host build for the simulated machine")
    assert "/dev/serial/by-id/" in msg


def test_cli_valves_overrides_the_section_type() -> None:
    args = build_parser().parse_args(["run", "--sim", "--valves", "mcu"])
    assert _overrides(args)["valves"] == {"type": "mcu"}
    cfg = config.load(config.sim_config_path(), _overrides(args))
    assert cfg.valves.type == "mcu" and cfg.simulated
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--sim", "--valves", "relay"])


def test_reference_documents_every_valve_backend() -> None:
    ref = config.reference()
    for kind in ("sim", "dry", "mcu", "jetson", "gpiod"):
        assert f'### `[valves]` type = "{kind}"' in ref
    assert "`valves.silence_ms` (default `200.0`)" in ref
