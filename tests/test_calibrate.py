"""`sorterd calibrate` on the simulated machine: healthy passes, every injected fault is caught."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.calibration import checklist as calibrate
from sorterd.cli import main
from sorterd.cli.compose import load_config
from sorterd.data.bundle import resolve_bundle
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.sim.rig import SimRig


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(resolve_bundle("default", None))


def checklist_steps(model: OnnxModel, **faults: float) -> dict[str, calibrate.StepResult]:
    cfg = load_config(config.sim_config_path(), {"sim": {"faults": faults}} if faults else None)
    profile, _, _ = calibrate.run_checklist(cfg, SimRig(cfg), model, io.StringIO(), interactive=False, warmup_s=0)
    steps = {s.name: s for s in profile.steps}
    steps["_profile"] = profile  # type: ignore[assignment]
    return steps


def test_healthy_machine_passes(model: OnnxModel) -> None:
    steps = checklist_steps(model)
    assert steps["_profile"].passed  # type: ignore[attr-defined]
    statuses = {k: v.status for k, v in steps.items() if k != "_profile"}
    assert statuses == {"warm-up": "skip", "reference frames": "pass", "backlight": "pass", "white balance": "pass",
                        "scale": "pass", "reference stones": "pass", "valve CUT": "pass", "valve SELECT": "pass",
                        "valve FLIP": "pass"}
    assert steps["scale"].measured["measured_px_per_mm"] == pytest.approx(20.0, rel=0.01)


def test_dimmer_backlight_fails(model: OnnxModel) -> None:
    s = checklist_steps(model, backlight=-0.08)
    assert s["backlight"].status == "fail"
    assert s["backlight"].message.startswith("-8.0% vs baseline (limit ±5%): adjust the LED driver current")
    assert not s["_profile"].passed  # type: ignore[attr-defined]


def test_white_balance_shift_warns(model: OnnxModel) -> None:
    s = checklist_steps(model, wb_delta_e=5.0)
    assert s["white balance"].status == "warn"
    assert s["white balance"].measured["delta_e"] == pytest.approx(5.0, abs=0.3)
    assert "dirty lens" in s["white balance"].message
    assert s["_profile"].passed  # type: ignore[attr-defined]  # a warning does not stop sorting


def test_scale_error_fails_with_the_measured_value(model: OnnxModel) -> None:
    s = checklist_steps(model, scale=0.10)
    assert s["scale"].status == "fail"
    assert s["scale"].measured["measured_px_per_mm"] == pytest.approx(22.0, rel=0.01)
    assert "set camera.pixels_per_mm = 22.0" in s["scale"].message


def test_mislabelled_reference_stones_fail(model: OnnxModel) -> None:
    s = checklist_steps(model, reference_mislabel=0.3)
    assert s["reference stones"].status == "fail"
    assert s["reference stones"].measured["agree"] == 14
    assert "< 90%" in s["reference stones"].message


def test_slow_valve_is_measured_and_corrected(model: OnnxModel) -> None:
    s = checklist_steps(model, cut_valve_slow_ms=3.0)
    assert s["valve CUT"].status == "pass"
    assert s["valve CUT"].measured["measured_ms"] == pytest.approx(6.0, abs=0.3)
    assert s["_profile"].opening_latency_ms["CUT"] == pytest.approx(6.0, abs=0.3)  # type: ignore[attr-defined]
    assert s["_profile"].opening_latency_ms["SELECT"] == pytest.approx(3.0, abs=0.3)  # type: ignore[attr-defined]


def test_profile_round_trip_and_apply(model: OnnxModel, tmp_path: Path) -> None:
    cfg = load_config(config.sim_config_path(), {"sim": {"faults": {"flip_valve_slow_ms": 2.0}}})
    profile, refs, base = calibrate.run_checklist(cfg, SimRig(cfg), model, io.StringIO(), False, 0)
    calibrate.save_profile(tmp_path, profile, refs, calibrate.session_meta(profile, profile.steps, base, cfg))
    loaded = calibrate.todays_profile(tmp_path, cfg.machine.name)
    assert loaded is not None and loaded.passed and (Path(loaded.reference_dir) / "toplit.png").exists()
    meta = json.loads((Path(loaded.reference_dir).parent / "session_meta.json").read_text())
    assert meta["reference_check_passed"] is True and meta["pixels_per_mm"] == pytest.approx(20.0, rel=0.01)
    applied = calibrate.apply(cfg, loaded)
    assert applied.ejection.opening_latency_ms["FLIP"] == pytest.approx(5.0, abs=0.3)


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--sim", "--yes", "--warmup-s", "0"]) == 0
    assert main(["calibrate", "--sim", "--yes", "--warmup-s", "0", "--sim-fault", "backlight=-0.08"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] backlight" in out and "calibration FAILED" in out
    assert list((tmp_path / "calibration" / "sim-1").glob("*/profile.json"))


def test_run_refuses_without_passing_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--sim", "--stones", "10", "--log-dir", str(tmp_path), "--no-progress", "--metrics-port", "0",
            "--sim-fault", "scale=0.1"]
    assert main(base) == 5
    assert "refusing to sort: today's calibration failed: scale" in capsys.readouterr().err
    assert not list(tmp_path.glob("batch_*"))
    assert main([*base, "--uncalibrated"]) == 0
    [batch] = list(tmp_path.glob("batch_*"))
    info = json.loads((batch / "batch.json").read_text())
    assert info["calibration"].startswith("OVERRIDDEN: today's calibration failed: scale")


def _disc_on_backlight(diameter_px: float, blur_px: float = 0.0, ss: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An opaque disc on a backlight (area-sampled edges), optionally defocused, with sensor noise."""
    h, w = 200, 300
    big = np.ones((h * ss, w * ss), np.float32)
    cv2.circle(big, (int(150.3 * ss), int(100.6 * ss)), int(round(diameter_px / 2 * ss)), 0.0, -1)
    light = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    if blur_px:
        light = cv2.GaussianBlur(light, (0, 0), blur_px)
    rng = np.random.default_rng(0)
    image = np.clip(30 + 170 * light + rng.normal(0, 2, light.shape), 0, 255).astype(np.uint8)
    reference = np.clip(200 + rng.normal(0, 2, light.shape), 0, 255).astype(np.uint8)
    return cv2.merge([image] * 3), cv2.merge([reference] * 3)


@pytest.mark.parametrize("blur_px", [0.0, 1.0, 2.0, 3.0])
def test_target_diameter_is_right_whatever_the_focus(blur_px: float) -> None:
    """A thresholded mask read a 2 px-defocused 80 px disc as 84 px (+5 %: a false scale failure)."""
    for d in (40.0, 80.0, 80.5):
        image, reference = _disc_on_backlight(d, blur_px)
        assert calibrate.target_diameter_px(image, reference) == pytest.approx(d, abs=0.1)


def test_an_instant_warm_up_shows_no_bar_that_claims_the_time_went_by() -> None:
    cfg = load_config(config.sim_config_path())
    out = io.StringIO()
    checklist = calibrate.Checklist(cfg, SimRig(cfg), out, None)
    checklist.warm_up(300)
    (step,) = checklist.results
    assert (step.status, step.measured) == ("pass", {"seconds": 0})
    assert "300/300" not in out.getvalue() and "warming up lights [" not in out.getvalue()
