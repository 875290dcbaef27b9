"""Model evaluation by the protocol (§8): metrics, the §8.4 verdict, model comparison.

Inference runs the ONNX bundle through `sorterd.parts.inference.onnxruntime.OnnxModel` -- the
sorter's own preprocessing and temperatures -- never torch.  Bins come from
the sorter's own decision policy (`sorterd.sorting.decide`): `class_bin` with each
stone's size for the true bin (§8.2), `decide` with the §5.2 gates for the
bin the sorter would choose; costs are `sorterd.sorting.summary.COST`.

Each stone's input is made by `sorterd.data.samples.load_samples` with the chosen ``source``
(`sorterd evaluate --crops`, as `sorterd train --crops`): cut from its raw frame pair the way
the sorter cuts it where its label links to one, else its processed crop.  A stone that gets no
input (skipped, with its reason) is not judged -- but never silently: ``inputs`` counts it, and
``n_asked`` > ``n_stones`` says fewer stones were judged than asked (`short_warning`).

Stones and what they count in:

* *classified* stones (colour + clarity labels): accuracies, confusion
  matrices, per-class and per-lot figures, ECE;
* *reject* stones (non-gem, §6.5): true bin REJECT -- counted in the bin
  figures (cost-weighted accuracy, CUT purity) and the flag rates;
* stones skipped without a reason (no class, no reject flag) count only in
  the flag rates: their right bin is unknown.

JSON keys (stable; more may be added): ``overall``, ``color``, ``clarity``,
``cost_weighted``, ``flagged_rate``, ``select_divert_rate``, ``cut_purity``,
``cut_recall``, ``per_class``, ``ece``, ``confusion``, ``bins``,
``per_lot``, ``subsets``, ``reliability``, ``verdict``, ``milestones``,
``n_stones``, ``n_classified``, ``n_reject``, ``model``, ``data``,
``error_flag_recall`` (the share of wrongly classified stones -- either head wrong --
that the sorter flagged or sent to SELECT: how much of its error the gates catch),
``ood_rate`` (share of stones over the bundle's OOD limit; None without the gate),
``drift`` (judged in order with the batch watch: its alarms, worst windowed share and the
stones ``decision.on_drift`` held; None when the stones were judged one by one),
``inputs`` (`evaluate_model`: ``source``, and how many stones' inputs came from raw frames, from
processed crops -- with each fallback's reason -- and were skipped, with each reason),
``n_asked`` (the stones asked for; ``n_stones`` are those judged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.config import DecisionConfig
from sorterd.data.bundle import INPUT_SIZE, OodSpec
from sorterd.data.dataset import Dataset, DatasetError, StoneLabel, measure_size_mm, stone_sizes
from sorterd.data.samples import DEFAULT_SOURCE, INPUT_CACHE, SampleReport, load_samples
from sorterd.domain import BINS, CLARITIES, CLASSES, COLORS, COST, cost_weighted_accuracy
from sorterd.parts.inference import Model
from sorterd.sorting.decide import Decision, class_bin, decide
from sorterd.sorting.drift import DriftWatch
from sorterd.train.temperature import calibration_error, expected_calibration_error, reliability_bins

SMALL_STONE_MM = 1.5  # §6.4
MIN_CLASS_N = 10  # classes with fewer test stones are reported, not judged (§8.4 item 4)
ECE_TARGET = 0.05
BATCH = 128

# §8.3 milestones: (overall, color, clarity, cost-weighted) at least, flagged rate at most.
MILESTONES: dict[str, tuple[float, float, float, float, float]] = {
    "Phase 1": (0.70, 0.75, 0.75, 0.75, 0.40),
    "Phase 2": (0.85, 0.88, 0.87, 0.88, 0.20),
    "Phase 3": (0.92, 0.94, 0.93, 0.93, 0.10),
    "Stretch": (0.95, 0.96, 0.96, 0.96, 0.05),
}
MILESTONE_KEYS = ("overall", "color", "clarity", "cost_weighted", "flagged_rate")


@dataclass
class Evaluation:
    """Per-stone results of one model on one set of stones, and the metrics dict."""

    labels: list[StoneLabel]
    sizes: list[float | None]
    p_color: np.ndarray  # (N, 3), COLORS order
    p_clarity: np.ndarray  # (N, 3), CLARITIES order
    true_bin: list[str | None]  # None: skipped stone, right bin unknown
    decided_bin: list[str]
    confidence: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    flagged: np.ndarray | None = None  # the sorter's flag per stone (confidence or OOD gate)
    ood: np.ndarray | None = None  # OOD scores; None: the model has no gate
    ood_limit: float = 1.0
    inputs: SampleReport | None = None  # where the inputs came from (None: given, not loaded)
    source: str = DEFAULT_SOURCE  # the load_samples source they were loaded with
    input_size: int = INPUT_SIZE  # the model's input side and window, to cut a stone's input again (report)
    crop_mm: float | None = None

    @property
    def stone_costs(self) -> tuple[np.ndarray, np.ndarray]:
        """(cost, worst possible cost) per stone with a known true bin, in stone order."""
        pairs = [(COST[BINS.index(t), BINS.index(d)], COST[BINS.index(t)].max())
                 for t, d in zip(self.true_bin, self.decided_bin, strict=True) if t is not None]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        a = np.array(pairs, dtype=np.float64)
        return a[:, 0], a[:, 1]


# -- predicting --------------------------------------------------------------------------


@dataclass
class Predicted:
    """The model's outputs for the stones that got an input, in the order asked."""

    labels: list[StoneLabel]  # those asked, less the skipped (`inputs` says which and why)
    p_color: np.ndarray  # (N, 3), COLORS order, calibrated
    p_clarity: np.ndarray  # (N, 3), CLARITIES order
    ood: np.ndarray | None  # OOD scores; None if the bundle has no gate
    sizes: list[float | None]  # sieve size per stone (`input_sizes`)
    inputs: SampleReport


def predict(model: Model, ds: Dataset, labels: Sequence[StoneLabel], source: str = DEFAULT_SOURCE,
            cache: Path | None = None) -> Predicted:
    """Each stone's input from `load_samples` (source, the model's size and crop_mm; cache: its
    InputCache folder), run through the model BATCH stones at a time."""
    m = model.manifest
    size = int(m.size[0])
    color_cols = [m.color_classes.index(c) for c in COLORS]
    clarity_cols = [m.clarity_classes.index(c) for c in CLARITIES]
    report = SampleReport()
    kept: list[StoneLabel] = []
    pc: list[np.ndarray] = []
    pk: list[np.ndarray] = []
    ood: list[float] = []
    sizes: list[float | None] = []
    for start in range(0, len(labels), BATCH):
        got, x, part = load_samples(ds, labels[start:start + BATCH], size, m.crop_mm, source, cache)
        report.add(part)
        if not got:
            continue
        preds, _ = model.predict(x)
        kept += got
        pc += [p.p_color[color_cols] for p in preds]
        pk += [p.p_clarity[clarity_cols] for p in preds]
        ood += [np.nan if p.ood is None else p.ood for p in preds]
        sizes += input_sizes(ds, got, x, size / m.crop_mm)
    return Predicted(kept, np.array(pc).reshape(-1, 3), np.array(pk).reshape(-1, 3),
                     None if m.ood is None else np.array(ood), sizes, report)


def input_sizes(ds: Dataset, labels: Sequence[StoneLabel], x: np.ndarray, px_per_mm: float) -> list[float | None]:
    """Each stone's sieve size: its label's, else measured from its processed backlit crop
    (`stone_sizes`), else -- no crop, as on a raw-only dataset -- from the backlit half of its
    input (x, at the input's px_per_mm)."""
    out: list[float | None] = []
    for lab, image in zip(labels, x, strict=True):
        if lab.size_mm is None and not ds.image_path("backlit", lab.stone_id).is_file():
            out.append(measure_size_mm(np.ascontiguousarray(image[:, :, :3]), px_per_mm))
        else:
            out.extend(stone_sizes(ds, [lab]))
    return out


def evaluate_model(model: Model, ds: Dataset, labels: Sequence[StoneLabel], decision: DecisionConfig,
                   source: str = DEFAULT_SOURCE) -> Evaluation:
    """These stones of `ds` through `model`, judged as the sorter would: its OOD gate and its batch
    watch (the manifest's ``ood``) -- what `sorterd evaluate` and `sorterd train`'s test figures show.
    Inputs as `predict` makes them (cached under the dataset's INPUT_CACHE); the metrics' ``inputs``
    and ``n_asked`` say where they came from and how many stones were skipped, and why."""
    got = predict(model, ds, labels, source, ds.root / INPUT_CACHE)
    if not got.labels:
        raise DatasetError(f"{ds.root}: none of the {len(labels)} stones to evaluate got an input with --crops "
                           f"{source}: {got.inputs.skipped_text()}")
    spec = model.manifest.ood
    ev = evaluate(got.labels, got.sizes, got.p_color, got.p_clarity, decision, got.ood,
                  spec.stone_limit if spec is not None else 1.0, spec)
    ev.inputs, ev.source, ev.input_size, ev.crop_mm = got.inputs, source, int(model.manifest.size[0]), model.manifest.crop_mm
    ev.metrics["n_asked"] = len(labels)
    ev.metrics["inputs"] = {"source": source, **got.inputs.as_dict(),
                            "summary": got.inputs.line(f"--crops {source}")}
    return ev


def short_warning(m: dict[str, Any]) -> str | None:
    """The loud line for metrics that judged fewer stones than asked (None: all were judged)."""
    asked, judged = m.get("n_asked"), m["n_stones"]
    if asked is None or asked == judged:
        return None
    return (f"judged only {judged} of the {asked} stones asked: {asked - judged} got no input with --crops "
            f"{m['inputs']['source']} and are not in these figures ({m['inputs']['summary']})")


def evaluate(labels: Sequence[StoneLabel], sizes: Sequence[float | None], p_color: np.ndarray,
             p_clarity: np.ndarray, decision: DecisionConfig, ood: np.ndarray | None = None,
             ood_limit: float = 1.0, drift: OodSpec | None = None) -> Evaluation:
    """All §8 metrics for these stones and probabilities (pure numpy: testable without a model);
    ood: the bundle's OOD scores (its gate decides as the sorter's does), None = no gate;
    drift: the bundle's batch limits -- the stones are then judged as the sorter meets them, in
    this order, with the sorter's own batch watch (`sorting.drift.DriftWatch`) and
    ``decision.on_drift`` while its alarm is raised; None = every stone alone."""
    if len(labels) == 0:
        raise ValueError("no stones to evaluate")
    if ood is not None and len(ood) != len(labels):
        raise ValueError(f"ood: {len(ood)} scores for {len(labels)} stones")
    known = [s if s is not None else decision.cut_min_size_mm for s in sizes]
    watch = DriftWatch(drift) if drift is not None and ood is not None else None
    decided: list[Decision] = []
    for i in range(len(labels)):
        score = None if ood is None else float(ood[i])
        if watch is not None:
            watch.stone(score)
        decided.append(decide(p_color[i], p_clarity[i], known[i], decision, COLORS, CLARITIES, score, ood_limit,
                              drifted=watch is not None and watch.alarmed))
    ev = Evaluation(
        labels=list(labels), sizes=list(sizes), p_color=np.asarray(p_color), p_clarity=np.asarray(p_clarity),
        true_bin=[_true_bin(lab, s, decision) for lab, s in zip(labels, known, strict=True)],
        decided_bin=[d.bin for d in decided],
        confidence=np.array([d.confidence for d in decided]),
        flagged=np.array([d.flagged for d in decided], dtype=bool),
        ood=None if ood is None else np.asarray(ood, dtype=np.float64), ood_limit=ood_limit,
    )
    ev.metrics = _metrics(ev, decision)
    ev.metrics["drift"] = None if watch is None else {
        "alarms": watch.state.alarms, "worst_window_share": round(watch.state.worst_share, 4),
        "held": sum(d.reason.startswith("batch drifted") for d in decided), "on_drift": decision.on_drift}
    return ev


def _true_bin(label: StoneLabel, size_mm: float, decision: DecisionConfig) -> str | None:
    if label.reject:
        return "REJECT"  # non-gem material (§6.5, §8.2)
    if label.color is None or label.clarity is None:
        return None
    return class_bin(label.color, label.clarity, size_mm, decision)


# -- metrics -------------------------------------------------------------------------------


def _metrics(ev: Evaluation, decision: DecisionConfig) -> dict[str, Any]:
    cls = np.array([lab.classified for lab in ev.labels])
    y_col = np.array([lab.color_index if lab.classified else -1 for lab in ev.labels])
    y_cla = np.array([lab.clarity_index if lab.classified else -1 for lab in ev.labels])
    col_ok = ev.p_color.argmax(1) == y_col
    cla_ok = ev.p_clarity.argmax(1) == y_cla
    both = col_ok & cla_ok
    out: dict[str, Any] = {
        "n_stones": len(ev.labels),
        "n_classified": int(cls.sum()),
        "n_reject": sum(1 for lab in ev.labels if lab.reject),
        "sizes_unknown": sum(1 for s in ev.sizes if s is None),
        "overall": _rate(both[cls]),
        "color": _rate(col_ok[cls]),
        "clarity": _rate(cla_ok[cls]),
    }
    out["per_class"] = _per_class(ev, both)
    out["min_class_accuracy"] = _min_class(out["per_class"])
    out["confusion"] = _confusions(ev, cls, y_col, y_cla)
    out.update(_bin_metrics(ev, decision))
    flagged = ev.flagged if ev.flagged is not None else ev.confidence < decision.sort_confidence
    over = (np.zeros(len(ev.labels), dtype=bool) if ev.ood is None
            else ~(ev.ood <= ev.ood_limit))  # NaN counts as out, as decide() does
    out["flagged_rate"] = _rate(flagged)
    out["select_divert_rate"] = _rate((ev.confidence < decision.flag_confidence) | over)
    out["ood_rate"] = None if ev.ood is None else _rate(over)
    wrong = cls & ~both
    out["error_flag_recall"] = _rate(flagged[wrong])
    out["ece"], out["reliability"] = _calibration(ev, cls, y_col, y_cla, both)
    out["per_lot"] = _per_lot(ev, both, col_ok, cla_ok, decision)
    out["subsets"] = _subsets(ev, both, decision)
    out["milestones"] = milestones(out)
    out["verdict"] = verdict(out)
    return out


def _rate(mask: np.ndarray) -> float | None:
    return round(float(np.mean(mask)), 5) if len(mask) else None


def _per_class(ev: Evaluation, both: np.ndarray) -> dict[str, dict[str, Any]]:
    out = {}
    for name in CLASSES:
        sel = np.array([lab.class_name == name for lab in ev.labels])
        out[name] = {"n": int(sel.sum()), "accuracy": _rate(both[sel])}
    return out


def _min_class(per_class: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Worst class with at least MIN_CLASS_N stones (the §8.4 "no class < 70 %" check)."""
    judged = {k: v for k, v in per_class.items() if v["n"] >= MIN_CLASS_N}
    too_few = sorted(k for k, v in per_class.items() if 0 < v["n"] < MIN_CLASS_N)
    if not judged:
        return {"class": None, "accuracy": None, "too_few_stones": too_few}
    worst = min(judged, key=lambda k: judged[k]["accuracy"])
    return {"class": worst, "accuracy": judged[worst]["accuracy"], "too_few_stones": too_few}


def _confusions(ev: Evaluation, cls: np.ndarray, y_col: np.ndarray, y_cla: np.ndarray) -> dict[str, Any]:
    """Rows = labelled class, columns = predicted class, counts."""
    pc, pk = ev.p_color.argmax(1)[cls], ev.p_clarity.argmax(1)[cls]
    tc, tk = y_col[cls], y_cla[cls]
    return {
        "color": {"labels": list(COLORS), "matrix": _counts(tc, pc, 3)},
        "clarity": {"labels": list(CLARITIES), "matrix": _counts(tk, pk, 3)},
        "combined": {"labels": list(CLASSES), "matrix": _counts(tc * 3 + tk, pc * 3 + pk, 9)},
    }


def _counts(true: np.ndarray, pred: np.ndarray, k: int) -> list[list[int]]:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m.tolist()


def _bin_metrics(ev: Evaluation, decision: DecisionConfig) -> dict[str, Any]:
    pairs = [(t, d) for t, d in zip(ev.true_bin, ev.decided_bin, strict=True) if t is not None]
    true = [t for t, _ in pairs]
    got = [d for _, d in pairs]
    argmax = [class_bin(COLORS[int(c)], CLARITIES[int(k)], s if s is not None else decision.cut_min_size_mm, decision)
              for c, k, s, t in zip(ev.p_color.argmax(1), ev.p_clarity.argmax(1), ev.sizes, ev.true_bin, strict=True)
              if t is not None]
    matrix = np.zeros((4, 4), dtype=np.int64)
    for t, d in pairs:
        matrix[BINS.index(t), BINS.index(d)] += 1
    cost, worst = ev.stone_costs
    decided_cut = sum(1 for d in got if d == "CUT")
    true_cut = sum(1 for t in true if t == "CUT")
    cut_ok = sum(1 for t, d in pairs if t == d == "CUT")
    return {
        "cost_weighted": _round(cost_weighted_accuracy(true, got)),
        "cost_weighted_argmax": _round(cost_weighted_accuracy(true, argmax)),
        "avg_cost_per_stone": _round(float(cost.mean())) if len(cost) else None,
        "bins": {"labels": list(BINS), "matrix": matrix.tolist(),
                 "accuracy": _round(float(np.trace(matrix) / matrix.sum())) if matrix.sum() else None},
        "cut_purity": _round(cut_ok / decided_cut) if decided_cut else None,
        "cut_recall": _round(cut_ok / true_cut) if true_cut else None,
        "cut": {"decided": decided_cut, "true": true_cut, "correct": cut_ok},
    }


def _round(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 5)


def _calibration(ev: Evaluation, cls: np.ndarray, y_col: np.ndarray, y_cla: np.ndarray,
                 both: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """ECE per head (top label, 15 bins) and of the §5.2 combined confidence vs both right."""
    if not cls.any():
        return {"color": None, "clarity": None, "combined": None}, {}
    pc, pk = ev.p_color[cls], ev.p_clarity[cls]
    ece = {
        "color": _round(expected_calibration_error(pc, y_col[cls])),
        "clarity": _round(expected_calibration_error(pk, y_cla[cls])),
        "combined": _round(calibration_error(ev.confidence[cls], both[cls])),
    }
    diagrams = {
        "color": (pc.max(1), pc.argmax(1) == y_col[cls]),
        "clarity": (pk.max(1), pk.argmax(1) == y_cla[cls]),
        "combined": (ev.confidence[cls], both[cls]),
    }
    reliability = {k: [asdict(b) for b in reliability_bins(conf, ok)] for k, (conf, ok) in diagrams.items()}
    return ece, reliability


def _per_lot(ev: Evaluation, both: np.ndarray, col_ok: np.ndarray, cla_ok: np.ndarray,
             decision: DecisionConfig) -> dict[str, dict[str, Any]]:
    out = {}
    for lot in sorted({lab.lot_id for lab in ev.labels}):
        sel = np.array([lab.lot_id == lot for lab in ev.labels])
        cls = sel & np.array([lab.classified for lab in ev.labels])
        out[lot] = {"n": int(sel.sum()), "n_classified": int(cls.sum()), "overall": _rate(both[cls]),
                    "color": _rate(col_ok[cls]), "clarity": _rate(cla_ok[cls]),
                    "cost_weighted": _subset_cost(ev, sel),
                    "flagged_rate": _rate(ev.confidence[sel] < decision.sort_confidence)}
    return out


def _subset_cost(ev: Evaluation, sel: np.ndarray) -> float | None:
    pairs = [(t, d) for t, d, s in zip(ev.true_bin, ev.decided_bin, sel, strict=True) if s and t is not None]
    return _round(cost_weighted_accuracy([t for t, _ in pairs], [d for _, d in pairs])) if pairs else None


def _subsets(ev: Evaluation, both: np.ndarray, decision: DecisionConfig) -> dict[str, dict[str, Any]]:
    """The §6 hard cases next to the clean stones: how often right, how often flagged."""
    def member(lab: StoneLabel, size: float | None) -> dict[str, bool]:
        return {"clean": not lab.flags, "uncertain": "uncertain" in lab.flags, "mixed": "mixed" in lab.flags,
                "damaged": "damaged" in lab.flags, "small": size is not None and size < SMALL_STONE_MM,
                "reject": lab.reject}

    rows = [member(lab, s) for lab, s in zip(ev.labels, ev.sizes, strict=True)]
    cls = np.array([lab.classified for lab in ev.labels])
    out = {}
    for name in ("clean", "uncertain", "mixed", "damaged", "small", "reject"):
        sel = np.array([r[name] for r in rows])
        out[name] = {"n": int(sel.sum()), "accuracy": _rate(both[sel & cls]),
                     "flagged_rate": _rate(ev.confidence[sel] < decision.sort_confidence),
                     "select_divert_rate": _rate(ev.confidence[sel] < decision.flag_confidence)}
    return out


# -- verdicts ------------------------------------------------------------------------------


def milestones(m: dict[str, Any]) -> dict[str, Any]:
    """§8.3: each phase's row, metric by metric; `reached` = the highest row fully met."""
    rows: dict[str, Any] = {}
    reached = None
    for phase, limits in MILESTONES.items():
        checks = {}
        for key, limit in zip(MILESTONE_KEYS, limits, strict=True):
            value = m.get(key)
            ok = None if value is None else (value <= limit if key == "flagged_rate" else value >= limit)
            checks[key] = {"target": limit, "value": value, "pass": ok}
        met = all(c["pass"] for c in checks.values())
        rows[phase] = {"met": met, "checks": checks}
        reached = phase if met else reached
    return {"reached": reached, "rows": rows}


def verdict(m: dict[str, Any]) -> dict[str, Any]:
    """§8.4 "good enough for unsupervised sorting", criterion by criterion."""
    worst = m["min_class_accuracy"]
    criteria = [
        _criterion("overall accuracy >= 90 %", m["overall"], 0.90),
        _criterion("CUT bin purity >= 95 %", m["cut_purity"], 0.95),
        _criterion("CUT recall >= 85 %", m["cut_recall"], 0.85),
        _criterion(f"no class below 70 % (worst: {worst['class']})", worst["accuracy"], 0.70),
        _criterion("cost-weighted accuracy >= 0.90", m["cost_weighted"], 0.90),
        {"name": "QA reference stones >= 90 % agreement", "value": None, "threshold": 0.90, "pass": None,
         "note": "needs the physical 50-stone reference kit (§2.4); not measurable from a dataset"},
    ]
    failed = [c["name"] for c in criteria if c["pass"] is False]
    pending = [c["name"] for c in criteria if c["pass"] is None]
    ready = not failed
    if failed:
        summary = "NOT READY for unsupervised sorting: fails " + "; ".join(failed)
    else:
        summary = "meets the §8.4 minimum on this data" + (f" (still to check: {'; '.join(pending)})" if pending else "")
    return {"ready": ready, "failed": failed, "pending": pending, "summary": summary, "criteria": criteria}


def _criterion(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    ok = None if value is None else bool(value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "pass": ok}


# -- comparing two models -------------------------------------------------------------------

COMPARE_KEYS = ("overall", "color", "clarity", "cost_weighted", "cut_purity", "cut_recall",
                "flagged_rate", "select_divert_rate")


def compare(old: Evaluation, new: Evaluation, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """§5.4 step 5: side by side, and which is better on cost-weighted accuracy.

    The verdict is paired (the same stones): a bootstrap over stones of the
    difference in cost-weighted accuracy; a difference whose 95 % interval
    contains 0 is called a tie.
    """
    if [lab.stone_id for lab in old.labels] != [lab.stone_id for lab in new.labels]:
        raise ValueError("compare: the two evaluations must cover the same stones in the same order")
    c_old, worst = old.stone_costs
    c_new, _ = new.stone_costs
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(worst), (resamples, len(worst))) if len(worst) else np.zeros((0, 0), int)
    diffs = (c_old[idx].sum(1) - c_new[idx].sum(1)) / worst[idx].sum(1) if len(worst) else np.zeros(1)
    lo, hi = (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)))
    delta = (new.metrics["cost_weighted"] or 0.0) - (old.metrics["cost_weighted"] or 0.0)
    if lo > 0:
        better, text = "new", "NEW is better on cost-weighted accuracy"
    elif hi < 0:
        better, text = "old", "OLD is better on cost-weighted accuracy: keep it"
    else:
        better = "tie"
        text = ("no significant difference in cost-weighted accuracy"
                + (" (new nominally ahead)" if delta > 0 else " (old nominally ahead)" if delta < 0 else ""))
    side = {k: {"old": old.metrics.get(k), "new": new.metrics.get(k),
                "delta": _delta(old.metrics.get(k), new.metrics.get(k))} for k in COMPARE_KEYS}
    return {"better": better, "verdict": text, "n_stones": len(new.labels),
            "cost_weighted_delta": round(delta, 5), "cost_weighted_delta_ci95": [round(lo, 5), round(hi, 5)],
            "metrics": side, "ready": {"old": old.metrics["verdict"]["ready"], "new": new.metrics["verdict"]["ready"]}}


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 5)


# -- text ----------------------------------------------------------------------------------


def format_text(m: dict[str, Any]) -> str:
    """The figures a person reads first, on a terminal."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    short = short_warning(m)
    lines = [
        *([f"WARNING: {short}"] if short else []),
        f"stones {m['n_stones']} ({m['n_classified']} classified, {m['n_reject']} non-gem)",
        *([m["inputs"]["summary"]] if m.get("inputs") else []),
        f"overall {pct(m['overall'])}  colour {pct(m['color'])}  clarity {pct(m['clarity'])}  "
        f"cost-weighted {m['cost_weighted']}",
        f"CUT purity {pct(m['cut_purity'])}  CUT recall {pct(m['cut_recall'])}  "
        f"flagged {pct(m['flagged_rate'])}  to SELECT (< {0.5:.2f}) {pct(m['select_divert_rate'])}",
        f"ECE colour {m['ece']['color']}  clarity {m['ece']['clarity']}  combined {m['ece']['combined']}",
        f"wrong stones flagged or to SELECT (error_flag_recall) {pct(m.get('error_flag_recall'))}  "
        f"out of distribution {pct(m['ood_rate']) if m.get('ood_rate') is not None else 'n/a (no gate)'}",
        *([f"batch drift alarms {m['drift']['alarms']} (worst window {pct(m['drift']['worst_window_share'])} out); "
           f"{m['drift']['held']} stones held by decision.on_drift = {m['drift']['on_drift']}"] if m.get("drift") else []),
        "per class: " + "  ".join(f"{k} {pct(v['accuracy'])} (n={v['n']})" for k, v in m["per_class"].items()),
        "per lot:   " + "  ".join(f"{k} {pct(v['overall'])} (n={v['n_classified']})" for k, v in m["per_lot"].items()),
        f"§8.3 milestone reached: {m['milestones']['reached'] or 'none'}",
        f"§8.4 verdict: {m['verdict']['summary']}",
    ]
    return "\n".join(lines)


def format_comparison(c: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"{'metric':<20}{'old':>10}{'new':>10}{'delta':>10}"]
    for key, row in c["metrics"].items():
        lines.append(f"{key:<20}{fmt(row['old']):>10}{fmt(row['new']):>10}{fmt(row['delta']):>10}")
    lo, hi = c["cost_weighted_delta_ci95"]
    lines.append(f"verdict ({c['n_stones']} stones): {c['verdict']} "
                 f"(delta {c['cost_weighted_delta']:+.4f}, 95% CI {lo:+.4f} .. {hi:+.4f})")
    return "\n".join(lines)
