"""Config validation: every refusal names section.key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorterd import config
from sorterd.cli import main
from sorterd.cli.compose import config_reference, load_config
from sorterd.configfile import ConfigError
from tests.conftest import problems_of, write_toml


def test_shipped_sim_config_is_valid() -> None:
    cfg = load_config(config.sim_config_path())
    assert cfg.simulated
    assert cfg.camera.type == "sim" and cfg.inference.type == "onnxruntime"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_toml(tmp_path, ""))
    assert cfg.decision.sort_confidence == 0.80
    assert cfg.metrics.host == "127.0.0.1"


def test_unknown_key_lists_valid_options(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[decision]\nsort_confidense = 0.9\n")
    assert msg.startswith("decision.sort_confidense: unknown option")
    assert "sort_confidence" in msg


def test_unknown_section(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[decisions]\n")
    assert "[decisions]: unknown section" in msg and "decision" in msg


def test_wrong_type_names_key_value_and_type(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[pipeline]\nqueue_size = "eight"\n')
    assert msg == "pipeline.queue_size = 'eight' has the wrong type: expected integer"


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[ejection]\nmargin_ms = true\n")
    assert "ejection.margin_ms = True has the wrong type: expected number" == msg


def test_out_of_range_gives_bounds(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[decision]\nsort_confidence = 1.5\n")
    assert msg == "decision.sort_confidence = 1.5 is too large: must be <= 1.0 (allowed range 0.0 .. 1.0)"


def test_choices(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[machine]\nsafe_route = "FLIP"\n')
    assert msg == "machine.safe_route = 'FLIP' is not allowed: choose one of 'REJECT', 'SELECT'"


def test_unknown_backend_type(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[valves]\ntype = "relay"\n')
    assert msg.startswith("valves.type = 'relay' is not a known backend: choose one of 'sim', 'dry'")


def test_backend_options_are_per_backend(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[camera]\ntype = "sim"\ndevice = "/dev/video0"\n')
    assert msg.startswith("camera.device: unknown option; valid options of [camera] are:")


def test_cross_field_check(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[decision]\nsort_confidence = 0.6\nflag_confidence = 0.7\n")
    assert "decision.flag_confidence = 0.7 must not exceed decision.sort_confidence = 0.6" == msg


def test_bins_table_checked(tmp_path: Path) -> None:
    text = """
[decision.bins]
blue = { transparent = "CUT", translucent = "FLIP", opaque = "FLIP" }
light = { transparent = "SELECT", translucent = "FLIP", opaque = "BIN9" }
inky = { transparent = "SELECT", translucent = "SELECT", opaque = "REJECT" }
"""
    [msg] = problems_of(tmp_path, text)
    assert msg == "decision.bins.light.opaque = 'BIN9': choose one of CUT, SELECT, FLIP, REJECT"


def test_nozzle_table_checked(tmp_path: Path) -> None:
    probs = problems_of(tmp_path, "[geometry]\nnozzle_drop_mm = { CUT = 30.0, SELECT = -1 }\n")
    assert any("needs exactly the keys CUT, SELECT, FLIP" in p for p in probs)
    assert any(p.startswith("geometry.nozzle_drop_mm.SELECT = -1") for p in probs)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    probs = problems_of(tmp_path, "[pipeline]\nqueue_size = 0\nworkers = 99\n")
    assert len(probs) == 2


def test_not_toml(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, "[decision\n")
    assert msg.startswith("not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_toml(tmp_path, "", "good.toml")
    bad = write_toml(tmp_path, "[metrics]\nport = 70000\n", "bad.toml")
    assert main(["check-config", str(good)]) == 0
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "metrics.port = 70000 is too large" in err and str(bad) in err


def test_run_with_bad_config_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_toml(tmp_path, "[sim]\nrate_per_s = -3\n[record]\nlog_dir = 'logs'\n")
    assert main(["run", "--config", str(bad), "--log-dir", str(tmp_path / "logs")]) == 2
    assert "sim.rate_per_s = -3.0 must be > 0.0" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_reference_documents_every_section() -> None:
    ref = config_reference()
    for section in ("machine", "geometry", "camera", "decision", "ejection", "record", "metrics", "sim"):
        assert f"[{section}]" in ref
    assert "`decision.sort_confidence` (default `0.8`)" in ref


def test_docs_config_reference_is_current() -> None:
    from tests.conftest import REPO

    doc = (REPO / "docs" / "config.md").read_text()
    assert config_reference() in doc, "docs/config.md is stale: regenerate with `sorterd check-config --reference`"


def test_replay_camera_needs_a_session(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[camera]\ntype = "replay"\n')
    assert msg == "camera.session is required with camera.type = 'replay': the session folder to replay"


def test_opencv_camera_needs_a_real_trigger(tmp_path: Path) -> None:
    [msg] = problems_of(tmp_path, '[camera]\ntype = "opencv"\nsource = "/dev/video0"\n')
    assert msg.startswith("camera.type = 'opencv' with trigger.type = 'sim': a real camera needs a real trigger")


def test_example_machine_config_is_valid() -> None:
    from tests.conftest import REPO

    cfg = load_config(REPO / "sorterd" / "configs" / "machine.toml")
    assert (cfg.camera.type, cfg.lights.type, cfg.trigger.type, cfg.valves.type) == ("opencv", "mcu", "beam", "mcu")
    assert not cfg.offline  # real hardware: the wall clock


def test_hardware_triggered_camera_needs_a_camera_pin() -> None:
    from tests.conftest import REPO

    with pytest.raises(config.ConfigError, match="camera.trigger = 'hardware' needs a strobe backend"):
        load_config(REPO / "sorterd" / "configs" / "machine.toml", {"lights": {"camera_pin": -1}})
    with pytest.raises(config.ConfigError, match="a real camera needs a real trigger"):
        load_config(REPO / "sorterd" / "configs" / "machine.toml", {"trigger": {"type": "sim"}})
