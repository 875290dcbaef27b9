"""Errors a first user meets at the command line: found before anything starts, one line each, the right exit.

A damaged model.onnx is a model error (exit 3) in every command that loads it;
an output path that cannot be written stops `run` and `calibrate` before the
model loads (exit 2), naming the flag or key, the path and why; check-config
looks at the model bundle too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sorterd.cli import main
from sorterd.cli.paths import Output, OutputPathError, check_outputs, dir_problem, file_problem
from sorterd.cli.run import RunResult
from sorterd.data.bundle import ModelError, sha256_file
from sorterd.parts.inference import onnxruntime as ort_backend
from sorterd.parts.inference.onnxruntime import OnnxModel

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "models" / "default"


def bundle_with_onnx(tmp_path: Path, onnx: bytes) -> Path:
    """The shipped bundle with another model.onnx, and a manifest whose sha256 matches it."""
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes(onnx)
    manifest = json.loads((DEFAULT / "manifest.json").read_text())
    manifest["onnx_sha256"] = sha256_file(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b


@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    onnx = (DEFAULT / "model.onnx").read_bytes()
    return bundle_with_onnx(tmp_path, onnx[: len(onnx) // 2])


def config_for(tmp_path: Path, bundle: Path | str) -> Path:
    p = tmp_path / "sorter.toml"
    p.write_text(f'[inference]\nmodel = "{bundle}"\n[record]\nlog_dir = "{tmp_path / "logs"}"\n'
                 f'[calibration]\ndir = "{tmp_path / "cal"}"\n[metrics]\nenabled = false\n')
    return p


def one_line_model_error(err: str, onnx: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "model error" in lines[0] and str(onnx) in lines[0] and "onnxruntime cannot load it" in lines[0]


# -- item 4: a model.onnx onnxruntime cannot parse ------------------------------------------------------


def test_a_truncated_onnx_is_a_model_error_naming_the_file(truncated: Path) -> None:
    with pytest.raises(ModelError) as exc:
        OnnxModel(truncated)
    msg = str(exc.value)
    assert msg.startswith(f"{truncated / 'model.onnx'}: onnxruntime cannot load it (")
    assert "\n" not in msg


def test_an_onnx_that_is_not_a_model_at_all_is_a_model_error(tmp_path: Path) -> None:
    bundle = bundle_with_onnx(tmp_path, b"this is not protobuf \x00\xff" * 40)
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        OnnxModel(bundle)


def test_every_onnxruntime_load_error_type_is_caught() -> None:
    import onnxruntime as ort

    caught = ort_backend._load_errors(ort)
    state = ort.capi.onnxruntime_pybind11_state
    for name in ("InvalidProtobuf", "Fail", "RuntimeException", "InvalidGraph"):
        assert getattr(state, name) in caught
        assert not issubclass(getattr(state, name), RuntimeError)  # why they are named: plain Exceptions


def test_run_with_a_truncated_onnx_exits_3_in_one_line(tmp_path: Path, truncated: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(config_for(tmp_path, truncated)), "--no-progress"]) == 3
    one_line_model_error(capsys.readouterr().err, truncated / "model.onnx")
    assert not (tmp_path / "logs").exists()


def test_calibrate_with_a_truncated_onnx_exits_3_in_one_line(tmp_path: Path, truncated: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--config", str(config_for(tmp_path, truncated)), "--yes"]) == 3
    one_line_model_error(capsys.readouterr().err, truncated / "model.onnx")
    assert not (tmp_path / "cal").exists()


def test_evaluate_with_a_truncated_onnx_exits_3_in_one_line(tmp_path: Path, truncated: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(truncated), "--data", str(tmp_path / "data")]) == 3
    one_line_model_error(capsys.readouterr().err, truncated / "model.onnx")


def test_a_manifest_naming_a_head_the_graph_lacks_is_refused_at_load(tmp_path: Path) -> None:
    bundle = bundle_with_onnx(tmp_path, (DEFAULT / "model.onnx").read_bytes())
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["outputs"]["clarity"] = "clarity_probs"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"has no output 'clarity_probs' \(the manifest's outputs\); its outputs are"):
        OnnxModel(bundle)


# -- item 5: output paths checked before anything starts ---------------------------------------------------


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the run itself: a refused command must never get there (no model, no calibration)."""
    calls: list[Any] = []

    def fake_run(*a: Any, **k: Any) -> RunResult:
        calls.append(a)
        return RunResult({"record": {"lost": {"rows": 0, "unseen": 0, "decisions": 0}}, "objects_decided": 0,
                          "captures": 0, "not_decided": {}}, Path("."))

    monkeypatch.setattr("sorterd.cli.run.run", fake_run)
    return calls


def run_sim(tmp_path: Path, *flags: str) -> int:
    return main(["run", "--sim", "--stones", "5", "--no-progress", "--metrics-port", "0", *flags])


def test_a_json_path_under_a_file_is_refused_before_the_run(tmp_path: Path, no_run: list[Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "summary.json"
    assert run_sim(tmp_path, "--log-dir", str(tmp_path / "logs"), "--json", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"--json {str(bad)!r}: its folder {str(tmp_path / 'afile')!r} is a file, not a directory" in err
    assert "cannot run the machine" not in err
    assert no_run == [] and not (tmp_path / "logs").exists()


def test_a_log_dir_that_is_a_file_is_refused_naming_the_flag(tmp_path: Path, no_run: list[Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "logs").write_text("x")
    assert run_sim(tmp_path, "--log-dir", str(tmp_path / "logs")) == 2
    assert f"--log-dir {str(tmp_path / 'logs')!r}: exists and is not a directory" in capsys.readouterr().err
    assert no_run == []


def test_a_bad_record_log_dir_in_the_config_names_the_key(tmp_path: Path, no_run: list[Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "logs").write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[record]\nlog_dir = "{tmp_path / "logs" / "batches"}"\n[metrics]\nenabled = false\n')
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    assert f"record.log_dir {str(tmp_path / 'logs' / 'batches')!r}: cannot be created" in capsys.readouterr().err
    assert no_run == []


def test_every_bad_output_is_named_at_once(tmp_path: Path, no_run: list[Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    assert run_sim(tmp_path, "--log-dir", str(tmp_path / "afile"), "--json", str(tmp_path / "adir"),
                   "--record", str(tmp_path / "afile" / "data"), "--decisions", str(tmp_path / "adir")) == 2
    err = capsys.readouterr().err
    assert err.startswith("sorterd run: cannot write the outputs:\n")
    assert f"--log-dir {str(tmp_path / 'afile')!r}: exists and is not a directory" in err
    assert f"--json {str(tmp_path / 'adir')!r}: is a directory: give a file name" in err
    assert f"--record {str(tmp_path / 'afile' / 'data')!r}: cannot be created" in err
    assert f"--decisions {str(tmp_path / 'adir')!r}: is a directory: give a file name" in err
    assert no_run == []


def test_good_outputs_pass_the_check_and_the_run_starts(tmp_path: Path, no_run: list[Any]) -> None:
    assert run_sim(tmp_path, "--log-dir", str(tmp_path / "new" / "logs"), "--json", str(tmp_path / "j" / "s.json"),
                   "--record", str(tmp_path / "data"), "--decisions", str(tmp_path / "d.jsonl")) == 0
    assert len(no_run) == 1
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_calibrate_refuses_a_calibration_dir_it_cannot_create_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ort_backend.OnnxModel, "__init__", no_model)
    (tmp_path / "afile").write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[calibration]\ndir = "{tmp_path / "afile" / "cal"}"\n')
    assert main(["calibrate", "--config", str(cfg), "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"calibration.dir {str(tmp_path / 'afile' / 'cal')!r}: cannot be created" in err
    cfg.write_text(f'[calibration]\ndir = "{tmp_path / "cal"}"\n')
    assert main(["calibrate", "--config", str(cfg), "--yes", "--json", str(tmp_path)]) == 2
    assert f"--json {str(tmp_path)!r}: is a directory: give a file name" in capsys.readouterr().err


def test_path_checks_accept_what_can_be_written(tmp_path: Path) -> None:
    assert dir_problem(tmp_path) is None
    assert dir_problem(tmp_path / "a" / "b" / "c") is None
    assert file_problem(tmp_path / "s.json") is None
    assert file_problem(tmp_path / "a" / "b" / "s.json") is None
    (tmp_path / "s.json").write_text("{}")
    assert file_problem(tmp_path / "s.json") is None  # replaced
    check_outputs([Output("--json", tmp_path / "s.json", "file"), Output("--log-dir", tmp_path / "x", "dir")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_a_directory_without_write_permission_is_named(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        assert dir_problem(ro) == "is a directory this user cannot write to"
        assert file_problem(ro / "s.json") == f"its folder {str(ro)!r} is not writable by this user"
        with pytest.raises(OutputPathError, match=r"--log-dir .*: cannot be created: .* is not writable"):
            check_outputs([Output("--log-dir", ro / "logs", "dir")])
    finally:
        ro.chmod(0o700)


# -- item 5: check-config looks at the model bundle --------------------------------------------------------


def test_check_config_refuses_a_model_directory_that_does_not_exist(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[inference]\nmodel = "models/v009"\n')
    assert main(["check-config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert f"inference.model = 'models/v009': model error: {tmp_path / 'models' / 'v009'}: no such directory" in err


def test_check_config_refuses_a_bundle_whose_manifest_does_not_read(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[inference]\nmodel = "b"\n')
    assert main(["check-config", str(cfg)]) == 3
    assert "manifest.json: not valid JSON" in capsys.readouterr().err


def test_check_config_names_the_model_it_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert main(["check-config", str(cfg)]) == 0
    version = json.loads((DEFAULT / "manifest.json").read_text())["version"]
    assert f"model {version} at {DEFAULT}" in capsys.readouterr().out
