"""The out-of-distribution gate: fit, graph, bundle, decision, evaluation, drift watch, calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sorterd.config import DecisionConfig
from sorterd.data.bundle import ModelError, OodSpec, read_manifest
from sorterd.data.dataset import StoneLabel
from sorterd.sorting.decide import decide
from sorterd.sorting.drift import DriftWatch, alarm_text
from sorterd.train.evaluate import evaluate

COLORS = ("blue", "light", "inky")
CLARITIES = ("transparent", "translucent", "opaque")
SPEC = OodSpec("ood_score", 1.0, 0.10, 50)


# -- decision ------------------------------------------------------------------------------


def test_a_stone_outside_goes_to_select_flagged_whatever_its_softmax_says() -> None:
    cfg = DecisionConfig()
    sure = np.array([0.99, 0.005, 0.005]), np.array([0.99, 0.005, 0.005])  # blue transparent: CUT
    assert decide(*sure, 3.0, cfg, COLORS, CLARITIES).bin == "CUT"
    assert decide(*sure, 3.0, cfg, COLORS, CLARITIES, ood=0.7).bin == "CUT"
    for score in (1.5, math.nan):
        d = decide(*sure, 3.0, cfg, COLORS, CLARITIES, ood=score)
        assert d.bin == cfg.low_confidence_bin == "SELECT" and d.flagged
        assert d.reason.startswith("out of distribution") and d.confidence > 0.98
    # A higher limit from the manifest moves the line.
    assert decide(*sure, 3.0, cfg, COLORS, CLARITIES, ood=1.5, ood_limit=2.0).bin == "CUT"


@pytest.mark.parametrize("mode, held", [("hold-cut", {"CUT"}), ("hold-all", {"CUT", "SELECT", "FLIP", "REJECT"}),
                                         ("alarm-only", set())])
def test_a_drifted_batch_holds_what_on_drift_names(mode: str, held: set[str]) -> None:
    cfg = DecisionConfig(on_drift=mode)
    sure = [0.98, 0.01, 0.01]
    cases = {"CUT": ("blue", "transparent"), "FLIP": ("blue", "translucent"), "SELECT": ("light", "transparent"),
             "REJECT": ("inky", "opaque")}
    for bin_, (color, clarity) in cases.items():
        pc = _onehot(COLORS, color, sure)
        pk = _onehot(CLARITIES, clarity, sure)
        calm = decide(pc, pk, 3.0, cfg, COLORS, CLARITIES, ood=0.5)
        assert calm.bin == bin_ and not calm.flagged
        d = decide(pc, pk, 3.0, cfg, COLORS, CLARITIES, ood=0.5, drifted=True)
        if bin_ in held:
            assert d.bin == "SELECT" and d.flagged and d.reason.startswith(f"batch drifted: {bin_} held")
        else:
            assert d == calm


def _onehot(classes: tuple[str, ...], name: str, sure: list[float]) -> np.ndarray:
    p = np.full(len(classes), sure[1])
    p[classes.index(name)] = sure[0]
    return p


def test_evaluation_meets_the_stones_in_order_with_the_sorters_batch_watch() -> None:
    # 60 stones far outside, then 40 confident CUT stones just inside the per-stone limit.
    n_out, n_in = 60, 40
    labels = [_label(i, "blue", "transparent") for i in range(n_out + n_in)]
    pc = np.tile([0.97, 0.02, 0.01], (n_out + n_in, 1))
    pk = np.tile([0.97, 0.02, 0.01], (n_out + n_in, 1))
    ood = np.r_[np.full(n_out, 3.0), np.full(n_in, 0.9)]
    sizes = [3.0] * (n_out + n_in)
    alone = evaluate(labels, sizes, pc, pk, DecisionConfig(), ood=ood).metrics
    assert alone["cut"]["decided"] == n_in and alone["drift"] is None
    batch = evaluate(labels, sizes, pc, pk, DecisionConfig(), ood=ood, drift=SPEC).metrics
    # The watch alarms at stone 50 (its minimum) and stays raised: all 40 are held, none in CUT.
    assert batch["drift"] == {"alarms": 1, "worst_window_share": 1.0, "held": n_in, "on_drift": "hold-cut"}
    assert batch["cut"]["decided"] == 0 and batch["flagged_rate"] == 1.0
    # The same stones the other way round: the calm ones come first and go to CUT.
    rev = evaluate(labels, sizes, pc, pk, DecisionConfig(), ood=ood[::-1].copy(), drift=SPEC).metrics
    assert rev["cut"]["decided"] == n_in and rev["drift"]["held"] == 0
    off = evaluate(labels, sizes, pc, pk, DecisionConfig(on_drift="alarm-only"), ood=ood, drift=SPEC).metrics
    assert off["cut"]["decided"] == n_in and off["drift"]["alarms"] == 1


# -- evaluation ----------------------------------------------------------------------------


def _label(i: int, color: str, clarity: str) -> StoneLabel:
    return StoneLabel(stone_id=f"S{i:06d}", color=color, clarity=clarity, lot_id="LOT-X", session_id="s",
                      flags=frozenset(), notes="", size_mm=3.0, line=i + 1)


def test_error_flag_recall_counts_wrong_stones_flagged_or_sent_to_select() -> None:
    # Four blue-transparent stones: two predicted right, two wrong (light), confidently.
    labels = [_label(i, "blue", "transparent") for i in range(4)]
    right, wrong = [0.97, 0.02, 0.01], [0.02, 0.97, 0.01]
    pc = np.array([right, right, wrong, wrong])
    pk = np.tile([0.97, 0.02, 0.01], (4, 1))
    sizes = [3.0] * 4
    no_gate = evaluate(labels, sizes, pc, pk, DecisionConfig()).metrics
    assert no_gate["error_flag_recall"] == 0.0 and no_gate["ood_rate"] is None
    # The gate catches one of the two wrong stones (and one right one).
    gated = evaluate(labels, sizes, pc, pk, DecisionConfig(), ood=np.array([0.2, 3.0, 0.4, 5.0])).metrics
    assert gated["error_flag_recall"] == 0.5
    assert gated["ood_rate"] == 0.5 and gated["select_divert_rate"] == 0.5 and gated["flagged_rate"] == 0.5
    with pytest.raises(ValueError, match="3 scores for 4 stones"):
        evaluate(labels, sizes, pc, pk, DecisionConfig(), ood=np.zeros(3))


# -- drift watch ---------------------------------------------------------------------------


def test_drift_alarm_is_raised_once_for_a_drifting_batch_and_rearmed_after() -> None:
    rng = np.random.default_rng(0)
    watch = DriftWatch(SPEC, window=100)
    known = [watch.stone(float(v)) for v in rng.uniform(0.0, 0.99, 300)]  # a known lot: none over
    assert not any(known) and not watch.alarmed
    lines = [watch.stone(float(v)) for v in rng.uniform(0.5, 3.0, 300)]  # a shifted lot: most over
    alarms = [x for x in lines if x]
    assert len(alarms) == 1 and watch.alarmed
    assert "the model does not know this machine/lot: collect and label 300 stones" in alarms[0]
    s = watch.summary()
    assert s["gate"] and s["alarms"] == 1 and s["over_limit"] == watch.state.over > 150
    assert "alarm" in s and s["worst_window_share"] > 0.5
    for v in rng.uniform(0.0, 0.9, 200):
        watch.stone(float(v))
    assert not watch.alarmed  # back under half the limit: re-armed
    assert [x for x in (watch.stone(5.0) for _ in range(100)) if x]  # a second episode alarms again
    assert watch.summary()["alarms"] == 2


def test_no_alarm_before_the_batch_has_enough_stones_and_none_without_a_gate() -> None:
    watch = DriftWatch(SPEC)
    assert all(watch.stone(9.0) is None for _ in range(SPEC.batch_min_stones - 1))
    assert watch.stone(9.0) is not None  # the 50th stone judges the batch
    off = DriftWatch(None)
    assert not off.gate and off.stone(9.0) is None and off.summary()["gate"] is False
    assert "collect and label 12 stones" in alarm_text(0.5, 40, SPEC, label=12)


# -- fit, graph, bundle --------------------------------------------------------------------


def _features(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    classes = rng.integers(0, 3, n)
    centres = np.array([[0.0] * 6, [3.0] + [0.0] * 5, [0.0, 3.0] + [0.0] * 4])
    x = centres[classes] + rng.standard_normal((n, 6)) * np.array([1.0, 0.5, 2.0, 1.0, 0.3, 1.0])
    return x + shift, classes


def test_mahalanobis_gate_passes_known_stones_and_catches_shifted_ones() -> None:
    from sorterd.train.ood import Gaussians, OodFit, fit_gaussians

    rng = np.random.default_rng(1)
    x, c = _features(2000, rng)
    g = fit_gaussians(x, c, (0, 6), shrinkage=0.0)
    val, _ = _features(1000, rng)
    limit = float(np.quantile(g.distance(val), 0.995))
    fit = OodFit((Gaussians(g.columns, g.means, g.precision, limit),), 0.0)
    fresh, _ = _features(2000, rng)
    assert (fit.score(fresh) > 1.0).mean() < 0.02  # the same distribution: ~0.5 % over
    shifted = fresh.copy()
    shifted[:, 4] += 2.0  # a narrow feature moved by ~7 of its sigmas
    assert (fit.score(shifted) > 1.0).mean() > 0.9
    # A class mean is a class mean: every class's own stones are near it.
    assert np.allclose(g.means[:, :2], [[0, 0], [3, 0], [0, 3]], atol=0.15)


def test_exported_gate_is_the_numpy_gate_and_the_sorter_reads_it(tmp_path: Path) -> None:
    import torch

    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.export import export_bundle
    from sorterd.train.mobilenet import MobileNetV3Small
    from sorterd.train.ood import fit_ood, head_features

    torch.manual_seed(3)
    model = MobileNetV3Small(width_mult=0.25, stone_stats=True).eval()
    rng = np.random.default_rng(2)
    x = rng.integers(60, 200, (48, 6, 128, 128), dtype=np.uint8)
    classes = np.arange(48) % 3
    mean, std = [0.5] * 6, [0.2] * 6
    fit = fit_ood(model, x[:32], classes[:32], x[32:], mean, std)
    assert len(fit.gates) == 2 and fit.gates[1].columns[1] - fit.gates[1].columns[0] == 13
    out = export_bundle(model, tmp_path / "v009", version="v009", mean=mean, std=std, crop_mm=6.4, ood=fit)
    m = read_manifest(out)
    assert m.ood == OodSpec("ood_score", 1.0, 0.10, 50)
    onnx = OnnxModel(out)
    hwc = np.ascontiguousarray(x[:8].transpose(0, 2, 3, 1))
    preds, _ = onnx.predict(hwc)
    expected = fit.score(head_features(model, x[:8], mean, std))
    got = np.array([p.ood for p in preds])
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3)
    # An old bundle (no "ood" in its manifest) keeps working, without a gate.
    plain = export_bundle(model, tmp_path / "v008", version="v008", mean=mean, std=std, crop_mm=6.4)
    old = OnnxModel(plain)
    assert old.manifest.ood is None and all(p.ood is None for p in old.predict(hwc)[0])
    # A manifest that promises a gate its graph lacks is refused at load, not at the first stone.
    raw = json.loads((plain / "manifest.json").read_text())
    raw["ood"] = {"output": "ood_score", "stone_limit": 1.0, "batch_share_limit": 0.1, "batch_min_stones": 50}
    (plain / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="has no output 'ood_score'"):
        OnnxModel(plain)
    raw["ood"] = {"output": "ood_score", "stone_limit": -1}
    (plain / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="ood = .*needs"):
        read_manifest(plain)


# -- calibration -----------------------------------------------------------------------------


class _Foreign:
    """The shipped model as a machine it never saw would find it: every stone out of distribution."""

    def __init__(self, inner: object, score: float) -> None:
        from dataclasses import replace

        self.inner = inner
        self.manifest = replace(inner.manifest, ood=SPEC)  # type: ignore[attr-defined]
        self.score = score

    @property
    def version(self) -> str:
        return str(self.inner.version)  # type: ignore[attr-defined]

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[object], float]:
        from dataclasses import replace

        preds, s = self.inner.predict(crops_hwc)  # type: ignore[attr-defined]
        return [replace(p, ood=self.score) for p in preds], s

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[object], float]:
        from dataclasses import replace

        preds, s = self.inner.predict_halves(halves)  # type: ignore[attr-defined]
        return [replace(p, ood=self.score) for p in preds], s


def test_reference_kit_step_fails_when_the_model_does_not_know_the_machine() -> None:
    import io

    from sorterd import config
    from sorterd.calibration import checklist
    from sorterd.cli.compose import load_config
    from sorterd.data.bundle import resolve_bundle
    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.sim.rig import SimRig

    cfg = load_config(config.sim_config_path())
    inner = OnnxModel(resolve_bundle("default", None))
    results = {}
    for score in (0.3, 4.0):
        profile, _, _ = checklist.run_checklist(cfg, SimRig(cfg), _Foreign(inner, score), io.StringIO(),  # type: ignore[arg-type]
                                                interactive=False, warmup_s=0)
        results[score] = next(s for s in profile.steps if s.name == "reference stones")
    assert results[0.3].status == "pass" and results[0.3].measured["out_of_distribution"] == 0
    bad = results[4.0]
    assert bad.status == "fail" and bad.measured["out_of_distribution"] == bad.measured["found"] > 0
    assert bad.message.startswith("the model does not know this machine/lot: collect and label 300 stones")


def test_the_run_summary_text_shouts_the_alarm() -> None:
    from sorterd.sorting.summary import _ood_lines

    watch = DriftWatch(SPEC)
    assert _ood_lines(DriftWatch(None).summary()) == []
    for _ in range(60):
        watch.stone(0.2)
    calm = _ood_lines(watch.summary())
    assert calm == ["out of distribution: 0 of 60 stones (0.0%) to SELECT, worst window 0.0%"]
    for _ in range(60):
        watch.stone(7.0)
    lines = _ood_lines(watch.summary())
    assert len(lines) == 2 and lines[1].startswith("ALARM: the model does not know this machine/lot")
