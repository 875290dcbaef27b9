"""Valve backend configuration: strict, and every refusal names section.key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli import _overrides, build_parser
from sorterd.cli.compose import config_reference, load_config
from sorterd.controller.gpio import GpioLibraryOptions
from sorterd.parts.valves.gpio import GpioValvesConfig
from tests.conftest import problems_of


def test_mcu_defaults_are_valid_for_the_simulated_machine() -> None:
    cfg = load_config(config.sim_config_path(), {"valves": {"type": "mcu"}})
    v = cfg.valves
    assert (v.type, v.port, v.silence_ms, v.max_on_ms) == ("mcu", "/dev/serial/by-id/usb-sorterd_valves-if00", 200.0, 40.0)
    assert cfg.sim.controller == "host_build"  # the simulated machine runs the firmware's host build
    assert v.silence_ms <= 250  # the fail-safe window the issue asks for, by default
    assert not cfg.offline  # so the run uses the wall clock: the firmware is real time


def test_options_of_one_backend_are_refused_by_another(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[valves]\ntype = "sim"\nport = "/dev/ttyACM0"\n')
    assert msg.startswith("valves.port: unknown option; valid options of [valves] are: command_latency_ms, type")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nnumbering = "BCM"\n')
    assert "valves.numbering: unknown option" in msg and "baudrate" in msg


@pytest.mark.parametrize("library", ["jetson", "gpiod"])
def test_the_old_gpio_valve_spelling_names_the_new_one(tmp_path: Path, library: str) -> None:
    [msg] = problems_of(tmp_path, f'[valves]\ntype = "{library}"\n')
    assert msg.startswith(f"valves.type = '{library}' is the old spelling: write valves.type = 'gpio' with "
                          f"valves.library = '{library}'"), msg


def test_gpio_valves_spell_library_chip_and_numbering_like_lights_and_trigger(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[valves]\ntype = "gpio"\nlibrary = "jetson"\nnumbering = "BCM"\npins = { CUT = 5, SELECT = 6, FLIP = 13 }\n'
                 '[lights]\ntype = "gpio"\nlibrary = "jetson"\n'
                 '[camera]\ntype = "opencv"\n[trigger]\ntype = "beam"\nlibrary = "jetson"\n')
    cfg = load_config(p)
    assert isinstance(cfg.valves, GpioValvesConfig)
    lines = cfg.valves.lines()
    assert (lines.library, lines.numbering, lines.pins) == ("jetson", "BCM", {"CUT": 5, "SELECT": 6, "FLIP": 13})
    fields = {f.name for f in dataclasses.fields(GpioLibraryOptions)}
    for section in (cfg.valves, cfg.lights, cfg.trigger):
        assert isinstance(section, GpioLibraryOptions) and fields <= {f.name for f in dataclasses.fields(section)}
    [msg] = problems_of(tmp_path, '[valves]\ntype = "gpio"\nlibrary = "jetson"\n[lights]\ntype = "gpio"\n')
    assert msg == "lights.library = 'gpiod' with valves.library = 'jetson': one board, one GPIO library"


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
    [msg] = problems_of(tmp_path, '[valves]\ntype = "gpio"\nlate_limit_us = 1500.0\n')
    assert msg.startswith("valves.late_limit_us = 1500.0 is above ejection.margin_ms = 1.0 ms")
    [msg] = problems_of(tmp_path, '[valves]\ntype = "mcu"\nsilence_ms = 5.0\n')
    assert msg == "valves.silence_ms = 5.0 is too small: must be >= 10.0 (allowed range 10.0 .. 5000.0)"


def test_the_controller_simulator_options_live_in_the_sim_section(tmp_path: Path) -> None:
    for key in ("sim_freq_hz", "sim_drift_ppm", "sim_offset", "sim_realtime"):
        [msg] = problems_of(tmp_path, f'[valves]\ntype = "mcu"\n{key} = 1\n')
        assert msg.startswith(f"valves.{key}: unknown option"), msg
    cfg = load_config(config.sim_config_path(), {"valves": {"type": "mcu"}, "sim": {"controller_drift_ppm": -12.5}})
    assert (cfg.sim.controller_freq_hz, cfg.sim.controller_drift_ppm) == (12e6, -12.5)
    [msg] = problems_of(tmp_path, '[sim]\ncontroller = "board"\n')
    assert msg == "sim.controller = 'board' is not allowed: choose one of 'host_build', 'port'"


def test_cli_valves_overrides_the_section_type() -> None:
    args = build_parser().parse_args(["run", "--sim", "--valves", "mcu"])
    assert _overrides(args)["valves"] == {"type": "mcu"}
    cfg = load_config(config.sim_config_path(), _overrides(args))
    assert cfg.valves.type == "mcu" and cfg.simulated
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--sim", "--valves", "relay"])


def test_reference_documents_every_valve_backend() -> None:
    ref = config_reference()
    for kind in ("sim", "dry", "mcu", "gpio"):
        assert f'### `[valves]` type = "{kind}"' in ref
    assert "`valves.silence_ms` (default `200.0`)" in ref
