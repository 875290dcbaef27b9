"""The reference kit (§8.4 item 6, issue 12 item 4): calibration's reference-stone step records the
crops it fed the model and their labels (kit.npz in the day's profile dir); `sorterd models stage`
and the release watcher judge every release on the newest one; a release failing it, or no kit at
all (unless `[models] require_kit = false`), is refused naming `reference-kit`."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sorterd import config
from sorterd.calibration import checklist as calibrate
from sorterd.cli import main
from sorterd.cli.compose import load_config
from sorterd.parts.inference.onnxruntime import OnnxModel
from sorterd.release.keys import generate
from sorterd.release.qa import KIT_FILE, KitPolicy, RecordedKit, kit_agreement, latest_kit, load_kit, save_kit
from sorterd.release.store import ReleaseStore
from sorterd.release.swap import open_release
from sorterd.release.verify import Refused
from sorterd.sim.rig import SimRig
from tests.release_fakes import DEFAULT, faithful_kit, make_release


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated calibration, saved: the profile dir of the day."""
    root = tmp_path_factory.mktemp("cal")
    cfg = load_config(config.sim_config_path())
    model = OnnxModel(DEFAULT)
    profile, refs, base = calibrate.run_checklist(cfg, SimRig(cfg), model, io.StringIO(), False, 0)
    assert profile.passed
    return calibrate.save_profile(root, profile, refs, calibrate.session_meta(profile, profile.steps, base, cfg))


def test_calibration_records_the_kit_the_gate_reads(recorded: Path) -> None:
    path = recorded / KIT_FILE
    kit = load_kit(path)
    steps = {s["name"]: s for s in json.loads((recorded / "profile.json").read_text())["steps"]}
    model = OnnxModel(DEFAULT)
    # Every stone the step found, at the model's input geometry, with its label as on the box.
    assert len(kit.labels) == steps["reference stones"]["measured"]["found"] > 0
    assert kit.crops.shape[1:] == (*model.manifest.size, 6) and kit.crops.dtype == np.uint8
    assert kit.crop_mm == model.manifest.crop_mm
    # The gate's agreement on the recorded kit is the calibration step's own (same crops, same model).
    want = steps["reference stones"]["measured"]["agree"] / len(kit.labels)
    assert kit_agreement(model, kit) == pytest.approx(want)
    assert latest_kit(recorded.parent.parent, recorded.parent.name) == path
    assert "kit" not in json.loads((recorded / "profile.json").read_text())


def test_a_failed_reference_step_records_no_kit() -> None:
    cfg = load_config(config.sim_config_path(), {"sim": {"faults": {"reference_mislabel": 0.3}}})
    checklist = calibrate.Checklist(cfg, SimRig(cfg), io.StringIO(), None)
    profile, _ = checklist.run(OnnxModel(DEFAULT), 0)
    assert {s.name: s.status for s in profile.steps}["reference stones"] == "fail"
    assert profile.kit is None  # a kit whose labels the model doubts does not become the gate's kit


def test_kit_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    kit = faithful_kit()
    back = load_kit(save_kit(tmp_path / KIT_FILE, replace(kit, crop_mm=6.4)))
    assert np.array_equal(back.crops, kit.crops) and back.labels == kit.labels and back.crop_mm == 6.4
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.npz: not a recorded reference kit"):
        load_kit(tmp_path / "bad.npz")
    np.savez(tmp_path / "odd.npz", crops=kit.crops.astype(np.float32), labels=np.array(kit.labels), crop_mm=1.0)
    with pytest.raises(ValueError, match="uint8 crops"):
        load_kit(tmp_path / "odd.npz")


def test_latest_kit_is_the_newest_day(tmp_path: Path) -> None:
    kit = faithful_kit()
    assert latest_kit(tmp_path, "sorter-1") is None
    for day in ("2026-11-30", "2026-12-02", "2026-12-01"):
        (tmp_path / "sorter-1" / day).mkdir(parents=True)
        save_kit(tmp_path / "sorter-1" / day / KIT_FILE, kit)
    assert latest_kit(tmp_path, "sorter-1") == tmp_path / "sorter-1" / "2026-12-02" / KIT_FILE


def _sorter(tmp_path: Path, require_kit: bool = True) -> tuple[Path, Path, Path]:
    """A sorter config with a release key and a calibration dir; (config, key, kit path of today)."""
    pub, sec = generate(tmp_path / "keys", "trainer")
    cal = tmp_path / "cal"
    cfg = tmp_path / "sorter.toml"
    cfg.write_text(f'[models]\ndir = "state"\ntrusted_keys = ["{pub}"]\nrequire_kit = {str(require_kit).lower()}\n'
                   f'[calibration]\ndir = "{cal}"\n')
    day = cal / "sorter-1" / date.today().isoformat()
    day.mkdir(parents=True)
    return cfg, sec, day / KIT_FILE


def _sign(tmp_path: Path, sec: Path, n: int) -> Path:
    out = tmp_path / f"r{n}"
    assert main(["models", "sign", str(DEFAULT), "--key", str(sec), "--release", str(n), "--out", str(out)]) == 0
    return out


def test_stage_runs_the_kit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, sec, kit_path = _sorter(tmp_path)
    r1, r2, r3, r4 = (_sign(tmp_path, sec, n) for n in (1, 2, 3, 4))
    capsys.readouterr()
    assert main(["models", "stage", str(r1), "--config", str(cfg)]) == 1  # no kit recorded yet
    err = capsys.readouterr().err
    assert "refused: reference-kit: no recorded reference kit" in err and "require_kit = false" in err
    good = faithful_kit()
    labels = good.labels[:]
    for i in range(0, len(labels), 5):  # every fifth wrong: about 80 % right, under the 90 % bound
        labels[i] = ("inky", "opaque") if labels[i] != ("inky", "opaque") else ("light", "transparent")
    save_kit(kit_path, RecordedKit(good.crops, labels))
    assert main(["models", "stage", str(r1), "--config", str(cfg)]) == 1
    right = sum(a == b for a, b in zip(labels, good.labels, strict=True)) / len(labels)
    assert f"refused: reference-kit: {right:.0%} of {len(labels)} reference stones" in capsys.readouterr().err
    save_kit(kit_path, RecordedKit(good.crops[:, :64, :64], good.labels))
    assert main(["models", "stage", str(r2), "--config", str(cfg)]) == 1
    assert "kit was recorded at 64x64 px" in capsys.readouterr().err
    save_kit(kit_path, good)
    assert main(["models", "stage", str(r3), "--config", str(cfg)]) == 0
    assert "release 3 staged" in capsys.readouterr().out
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["highest_accepted"] == 3  # the refused ones were never accepted
    assert sorted(p.name for p in (tmp_path / "state" / "releases").iterdir()) == ["3"]
    kit_path.unlink()
    cfg_off, _, _ = _sorter(tmp_path / "off", require_kit=False)
    text = cfg_off.read_text().replace(str(tmp_path / "off" / "keys"), str(tmp_path / "keys"))
    cfg_off.write_text(text)
    assert main(["models", "stage", str(r4), "--config", str(cfg_off)]) == 0  # golden only, by choice


def test_the_swap_runs_the_kit_too(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = ReleaseStore(tmp_path / "state", [key.public_key()], 50_000_000)
    store.stage(make_release(tmp_path / "r1", key, 1), None)
    good = faithful_kit()
    bad = RecordedKit(good.crops, [("inky", "opaque")] * len(good.labels))
    options = load_config(config.sim_config_path()).inference
    assert open_release(store, 1, options, KitPolicy(lambda: save_kit(tmp_path / "g.npz", good))).release == 1
    with pytest.raises(Refused) as e:
        open_release(store, 1, options, KitPolicy(lambda: save_kit(tmp_path / "b.npz", bad)))
    assert e.value.check == "reference-kit" and "< 90%" in str(e.value)
    with pytest.raises(Refused) as e:
        open_release(store, 1, options, KitPolicy(lambda: None))
    assert e.value.check == "reference-kit"
    assert open_release(store, 1, options, KitPolicy(lambda: None, require=False)).release == 1
