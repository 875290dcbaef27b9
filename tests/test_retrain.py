"""The §5.4 retraining runner: trigger rules, the §8.4 gate, status transitions, the §5.5 new-label count."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sorterd.cli import main
from sorterd.trainer import retrain as rt

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0


# -- trigger -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("new", "since_days", "requested", "due"), [
    (499, 1.0, None, False),
    (500, 1.0, None, True),            # the batch of 500
    (500, None, None, True),
    (99, 8.0, None, False),            # a week, but under 100
    (100, 8.0, None, True),            # weekly with >= 100
    (100, 6.9, None, False),           # >= 100, not yet a week
    (100, None, None, False),          # no model time known: never "weekly"
    (0, 0.0, "operator asked", True),  # a request runs whatever the count
])
def test_trigger_rules(new: int, since_days: float | None, requested: str | None, due: bool) -> None:
    reason = rt.trigger(new, None if since_days is None else since_days * DAY, requested)
    assert (reason is not None) == due
    if requested:
        assert reason == f"requested: {requested}"


def test_policy_is_the_schedule() -> None:
    p = rt.RetrainPolicy(batch=10, weekly_min=3, week_s=60)
    assert rt.trigger(10, 0, None, p) and not rt.trigger(9, 59, None, p) and rt.trigger(3, 60, None, p)


# -- the gate ------------------------------------------------------------------------------------


def _evaluation(**values: float | None) -> dict[str, Any]:
    base = {"overall": 0.95, "cut_purity": 0.97, "cut_recall": 0.9, "worst": 0.8, "cost_weighted": 0.95}
    base.update(values)
    rows = [("overall accuracy >= 90 %", base["overall"], 0.90), ("CUT bin purity >= 95 %", base["cut_purity"], 0.95),
            ("CUT recall >= 85 %", base["cut_recall"], 0.85), ("no class below 70 % (worst: x)", base["worst"], 0.70),
            ("cost-weighted accuracy >= 0.90", base["cost_weighted"], 0.90)]
    criteria = [{"name": n, "value": v, "threshold": t, "pass": None if v is None else v >= t} for n, v, t in rows]
    criteria.append({"name": "QA reference stones >= 90 % agreement", "value": None, "threshold": 0.9, "pass": None})
    return {"verdict": {"criteria": criteria, "summary": "s"}}


def _comparison(better: str = "new") -> dict[str, Any]:
    return {"better": better, "verdict": f"{better} verdict", "cost_weighted_delta": 0.01,
            "cost_weighted_delta_ci95": [0.002, 0.02]}


def test_a_better_model_that_meets_8_4_passes_with_the_kit_pending() -> None:
    refusals, pending = rt.gate(_comparison(), _evaluation())
    assert refusals == [] and pending == ["QA reference stones >= 90 % agreement"]


@pytest.mark.parametrize(("better", "values", "says"), [
    ("tie", {}, "not better on cost-weighted accuracy: tie verdict"),
    ("old", {}, "not better on cost-weighted accuracy: old verdict"),
    ("new", {"overall": 0.89}, "§8.4: overall accuracy >= 90 %: 0.8900 < 0.9"),
    ("new", {"cut_purity": 0.94}, "§8.4: CUT bin purity >= 95 %: 0.9400 < 0.95"),
    ("new", {"cut_recall": 0.84}, "§8.4: CUT recall >= 85 %: 0.8400 < 0.85"),
    ("new", {"worst": 0.69}, "§8.4: no class below 70 % (worst: x): 0.6900 < 0.7"),
    ("new", {"cost_weighted": 0.899}, "§8.4: cost-weighted accuracy >= 0.90: 0.8990 < 0.9"),
    ("new", {"cut_purity": None}, "§8.4: CUT bin purity >= 95 %: not measurable on the held-out stones"),
])
def test_each_refusal_names_its_criterion(better: str, values: dict[str, float | None], says: str) -> None:
    refusals, _ = rt.gate(_comparison(better), _evaluation(**values))
    assert len(refusals) == 1 and refusals[0].startswith(says)


def test_no_verdict_is_a_refusal() -> None:
    assert rt.gate(_comparison(), {})[0] == ["§8.4: no verdict in the evaluation"]


# -- status, requests, new labels ------------------------------------------------------------------


def _dataset(root: Path, ids: list[str], unclassified: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"stone_id": s, "color": None, "clarity": None, "reject": True} if s in unclassified
                        else {"stone_id": s, "color": "blue", "clarity": "opaque", "lot_id": "L1"}) for s in ids]
    (root / "labels.jsonl").write_text("".join(x + "\n" for x in lines))
    return root


def _bundle(path: Path, data: str = "/elsewhere", splits: str = "", created: str = "2026-01-01T00:00:00Z") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"version": "v002", "created": created, "training": {
        "data": {"dir": data}, "splits": {"dir": splits}}}))
    return path


def test_status_is_idle_then_interrupted_when_no_runner_holds_the_lock(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["S1"])
    assert rt.read_status(root)["state"] == "idle"
    (root / "retrain").mkdir()
    for state in rt.ACTIVE:
        (root / "retrain" / "status.json").write_text(json.dumps({"state": state, "run": "r"}))
        with rt._runner_lock(root):  # a live runner: what it says stands
            assert rt.read_status(root)["state"] == state
            with pytest.raises(rt.RetrainBusy, match="a retrain is running already"):
                rt.run_retrain(root, _bundle(tmp_path / f"b-{state}"), "x")
        s = rt.read_status(root)  # the runner died mid-run: never reported as done
        assert s["state"] == "interrupted" and s["interrupted_in"] == state


def test_training_status_carries_the_progress(tmp_path: Path) -> None:
    from sorterd.train.loop import StepEvent
    from sorterd.train.progress import JsonProgress

    root = _dataset(tmp_path / "ds", ["S1"])
    run = root / "retrain" / "runs" / "r1"
    run.mkdir(parents=True)
    (root / "retrain" / "status.json").write_text(json.dumps({"state": "training", "run": "r1"}))
    prog = JsonProgress(run / "progress.json", every_s=0.0)
    for batch in (1, 2):
        prog.step(StepEvent(epoch=2, total_epochs=4, phase="full", batch=batch, n_batches=2, loss=0.5,
                            color_acc=0.5, clarity_acc=0.5))
    with rt._runner_lock(root):
        s = rt.read_status(root)
    assert (s["epoch"], s["epochs"], s["fraction"]) == (2, 4, 0.5) and s["eta_s"] is not None and s["eta_s"] >= 0


def test_request_run_validates_and_is_taken_by_due(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["S1", "S2"])
    bundle = _bundle(tmp_path / "b", created=datetime.now(timezone.utc).isoformat())
    assert rt.due(root, bundle) == (None, 2)
    for bad, says in (("", "must be a non-empty string"), ("x" * 201, "201 characters; at most 200")):
        with pytest.raises(rt.RetrainError, match=says):
            rt.request_run(root, bad)
    assert not (root / "retrain" / "request.json").exists()  # a refused request changes nothing
    with pytest.raises(rt.RetrainError, match="no labels.jsonl"):
        rt.request_run(tmp_path / "nowhere", "why")
    out = rt.request_run(root, "new lot from Kanchanaburi")
    assert out["requested"] and out["status"]["request"]["reason"] == "new lot from Kanchanaburi"
    assert rt.due(root, bundle) == ("requested: new lot from Kanchanaburi", 2)


def test_weekly_trigger_reads_the_model_time(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", [f"S{i}" for i in range(120)])
    now = datetime(2026, 3, 10, tzinfo=timezone.utc)
    old = _bundle(tmp_path / "old", created=(now - timedelta(days=8)).isoformat())
    new = _bundle(tmp_path / "new", created=(now - timedelta(days=2)).isoformat())
    assert rt.due(root, old, now=now)[0] is not None and rt.due(root, new, now=now)[0] is None


def test_new_labels_are_the_classified_ones_no_snapshot_of_the_last_model_holds(tmp_path: Path) -> None:
    ids = [f"S{i}" for i in range(10)]
    root = _dataset(tmp_path / "ds", ids, unclassified=("S9",))
    snap = root / "splits" / "v002"
    snap.mkdir(parents=True)
    (snap / "train.txt").write_text("S0\nS1\n")
    (snap / "val.txt").write_text("S2\n")
    (snap / "test.txt").write_text("S3\n")  # tested on is seen too
    elsewhere = _bundle(tmp_path / "b1")
    assert rt.new_label_ids(root, elsewhere) == ids[:9]  # trained on other data: all classified are new
    here = _bundle(tmp_path / "b2", data=str(root.resolve()), splits=str(snap))
    assert rt.new_label_ids(root, here) == ids[4:9]
    # A model trained here since (the log's last entry for this dataset) moves the line on.
    snap3 = root / "splits" / "v003"
    snap3.mkdir()
    (snap3 / "train.txt").write_text("\n".join(ids[:7]) + "\n")
    rt.models_dir(root).mkdir()
    rt.model_log(root).write_text(json.dumps({"version": "v003", "data": str(root.resolve()), "splits": "v003",
                                              "timestamp": "2026-03-01T00:00:00+00:00"}) + "\n{torn")
    assert rt.new_label_ids(root, here) == ["S7", "S8"]


def test_cli_status_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "ds", ["S1"])
    assert main(["retrain", "--data", str(root), "--status"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "idle"
    assert main(["retrain", "--data", str(root)]) == 2
    assert "--model BUNDLE is required" in capsys.readouterr().err
    assert main(["retrain", "--data", str(root), "--model", str(tmp_path / "nope")]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    bundle = _bundle(tmp_path / "b", created=datetime.now(timezone.utc).isoformat())
    assert main(["retrain", "--data", str(root), "--model", str(bundle)]) == 0
    assert "1 new labels; no retrain due" in capsys.readouterr().out


# -- a real (tiny) run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_real_run_counts_exactly_the_new_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "ds"
    for lot, lot_id, n, seed in (("thai-mixed", "LOT-R1", 24, 11), ("anakie-dark", "LOT-R2", 10, 12)):
        assert main(["sim", "generate", "--out", str(data), "--stones", str(n), "--lot", lot, "--lot-id", lot_id,
                     "--seed", str(seed), "--date", "2026-03-02"]) == 0
    bundle = tmp_path / "current" / "default"
    shutil.copytree(REPO / "models" / "default", bundle)
    capsys.readouterr()
    new = rt.new_label_ids(data, bundle)
    assert len(new) == 34 - sum(1 for line in (data / "labels.jsonl").read_text().splitlines()
                                if json.loads(line)["color"] is None)
    tiny = "--epochs-heads 1 --epochs 1 --batch-size 16 --threads 2"
    code = main(["retrain", "--data", str(data), "--model", str(bundle), "--now", "--reason", "test",
                 "--test-lots", "LOT-R2", "--train-args", tiny])
    out, err = capsys.readouterr()
    assert code in (0, 4), err
    s = rt.read_status(data)
    assert s["state"] == "done" and s["reason"] == "requested: test" and s["new_labels"] == len(new)
    assert s["log_entry"]["new_samples_since_last"] == len(new)  # §5.5: exactly the new labels
    shipped = json.loads((bundle / "manifest.json").read_text())["version"]
    after = f"v{int(shipped[1:]) + 1:03d}"  # fine-tuned from the shipped model: the next version
    assert s["log_entry"]["version"] == s["version"] == after and "request" not in s
    for key in ("train_log", "evaluate", "compare", "report_html"):
        assert Path(s["reports"][key]).is_file(), key
    if code == 4:
        assert s["refused"] and "not a candidate" in out and not (data / "releases" / "candidates" / after).exists()
    else:
        cand = data / "releases" / "candidates" / after
        assert json.loads((cand / "candidate.json").read_text())["version"] == after
        assert (cand / "model.onnx").is_file()
    # Nothing new since: not due; the next model's count starts from this one.
    assert rt.due(data, bundle) == (None, 0)
