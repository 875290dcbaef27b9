"""The review page's HTTP API and label store: §3.4 lines, undo, conflicts, bad input, §3.3/§3.5."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from sorterd.data.dataset import DatasetError, effective_labels, open_dataset, read_labels  # noqa: E402
from sorterd.domain import CLARITIES, COLORS  # noqa: E402
from sorterd.trainer.labels import LabelError, LabelStore, cohen_kappa  # noqa: E402
from sorterd.trainer.review.app import make_app  # noqa: E402
from tests.reviewdata import flagged_dataset  # noqa: E402

SECTION_3_4 = {"stone_id", "color", "clarity", "lot_id", "session_id", "annotator", "timestamp", "uncertain",
               "mixed", "damaged", "reject", "notes"}


def run(root: Path, scenario: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(make_app(root))) as client:
            return await scenario(client)
    return asyncio.run(main())


def label(sid: str, who: str = "duke", color: str | None = "blue", clarity: str | None = "transparent",
          **extra: Any) -> dict[str, Any]:
    return {"stone_id": sid, "annotator": who, "color": color, "clarity": clarity, "uncertain": False,
            "mixed": False, "damaged": False, "reject": False, "notes": "", **extra}


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "labels.jsonl", root / "review" / "checks.jsonl") if p.exists()}


def test_queue_is_in_priority_order_and_labels_carry_every_3_4_field(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 12)

    async def scenario(c: TestClient) -> tuple[list[dict[str, Any]], int, dict[str, Any], dict[str, Any]]:
        items = (await (await c.get("/api/queue", params={"annotator": "duke", "limit": "100"})).json())["items"]
        r = await c.post("/api/labels", json=label(items[0]["stone_id"], notes="borderline", uncertain=True))
        stored = await r.json()
        img = await c.get(items[0]["images"]["toplit_full"])
        assert img.status == 200 and (await img.read()).startswith(b"\x89PNG")
        counts = await (await c.get("/api/counts")).json()
        return items, r.status, stored, counts

    items, status, stored, counts = run(tmp_path, scenario)
    assert sorted(q["stone_id"] for q in items) == sorted(ids)
    priorities = [q["priority"] for q in items]
    assert priorities == sorted(priorities, reverse=True)
    assert {"sorter_id", "lot_id", "size_mm", "p_color", "p_clarity"} <= set(items[0])
    assert status == 201 and SECTION_3_4 <= set(stored)
    assert stored["timestamp"][-6] in "+-"  # §3.4: a timestamp with its offset
    (line,) = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert json.loads(line) == stored
    (lab,) = open_dataset(tmp_path).labels  # training reads what the page wrote
    assert (lab.stone_id, lab.color, lab.clarity, lab.flags) == (items[0]["stone_id"], "blue", "transparent",
                                                                  frozenset({"uncertain"}))
    assert counts["by_class"]["blue_transparent"] == 1 and counts["queue"] == len(ids) - 1


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ("unknown stone", 404, "unknown stone_id"),
    ("unknown color", 400, "allowed are blue, light, inky"),
    ("unknown clarity", 400, "allowed are transparent, translucent, opaque"),
    ("oversized notes", 400, "at most 2000 characters"),
    ("half a class", 400, "give both, or both null"),
    ("reject with class", 400, "reject"),
    ("no annotator", 400, "annotator"),
    ("flag not bool", 400, "must be true or false"),
    ("extra field", 400, "unknown field"),
    ("same person twice", 409, "already labelled by duke"),
])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(tmp_path: Path, body: bytes | str, status: int,
                                                       words: str) -> None:
    ids = flagged_dataset(tmp_path, 3)
    LabelStore(tmp_path).add(label(ids[0]))
    bodies: dict[str, dict[str, Any]] = {
        "unknown stone": label("press9.x.S000001"), "unknown color": label(ids[1], color="purple"),
        "unknown clarity": label(ids[1], clarity="milky"), "oversized notes": label(ids[1], notes="x" * 2001),
        "half a class": label(ids[1], clarity=None), "reject with class": label(ids[1], reject=True),
        "no annotator": label(ids[1], who=""), "flag not bool": label(ids[1], mixed="yes"),
        "extra field": label(ids[1], colour="blue"), "same person twice": label(ids[0], color="inky"),
    }
    data = body if isinstance(body, bytes) else json.dumps(bodies[body]).encode()
    before = files(tmp_path)

    async def scenario(c: TestClient) -> tuple[int, dict[str, Any]]:
        r = await c.post("/api/labels", data=data, headers={"Content-Type": "application/json"})
        return r.status, await r.json()

    got, answer = run(tmp_path, scenario)
    assert got == status
    assert words in answer["error"] and "\n" not in answer["error"]
    assert files(tmp_path) == before


def test_other_bad_requests_are_json_4xx(tmp_path: Path) -> None:
    flagged_dataset(tmp_path, 2)

    async def scenario(c: TestClient) -> list[tuple[int, str]]:
        out = []
        for method, path, body in [("GET", "/api/queue?annotator=duke&limit=0", None),
                                   ("GET", "/api/queue?limit=5", None),
                                   ("GET", "/api/queue?annotator=duke&mode=all", None),
                                   ("GET", "/api/stone/nope", None),
                                   ("GET", "/images/sideways_crop/x.png", None),
                                   ("POST", "/api/undo", {"annotator": "nobody"}),
                                   ("POST", "/api/labels", "x" * 70000)]:
            r = await c.request(method, path, data=None if body is None else json.dumps(body))
            out.append((r.status, (await r.json())["error"]))
        return out

    answers = run(tmp_path, scenario)
    assert [s for s, _ in answers] == [400, 400, 400, 404, 404, 404, 413]
    assert "1..1000" in answers[0][1] and "annotator" in answers[1][1] and "label, gold, spot" in answers[2][1]
    assert "backlit_crop" in answers[4][1] and "no label to undo" in answers[5][1]


def test_undo_retracts_several_levels_and_the_stones_come_back(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 4)
    store = LabelStore(tmp_path)
    for sid, color in zip(ids[:3], COLORS, strict=True):
        store.add(label(sid, color=color))
    assert store.undo("duke")["stone_id"] == ids[2]
    assert store.undo("duke")["stone_id"] == ids[1]
    store.add(label(ids[1], color="inky", clarity="opaque"))  # labelled again after its undo
    labels = read_labels(tmp_path / "labels.jsonl")
    assert {(lab.stone_id, lab.color) for lab in labels} == {(ids[0], "blue"), (ids[1], "inky")}
    assert effective_labels(tmp_path) == labels
    assert {q["stone_id"] for q in store.queue("duke", 100)} == {ids[2], ids[3]}
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 6  # append-only: nothing rewritten
    assert LabelStore(tmp_path).counts() == store.counts()  # the state is what the file says


def test_a_torn_last_line_is_skipped_by_readers_and_cut_by_the_next_writer(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 3)
    LabelStore(tmp_path).add(label(ids[0]))
    whole = (tmp_path / "labels.jsonl").read_bytes()
    half = json.dumps(label(ids[1], color="light")).encode()[:40]
    with open(tmp_path / "labels.jsonl", "ab") as f:  # the writer killed mid-line
        f.write(half)
    assert [lab.stone_id for lab in read_labels(tmp_path / "labels.jsonl")] == [ids[0]]
    store = LabelStore(tmp_path)  # reopens: the torn tail is cut, the next line starts clean
    assert (tmp_path / "labels.jsonl").read_bytes() == whole
    store.add(label(ids[1], color="light"))
    assert [lab.stone_id for lab in read_labels(tmp_path / "labels.jsonl")] == [ids[0], ids[1]]


def test_two_annotators_hammering_at_once_lose_nothing(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 24)

    async def annotator(c: TestClient, who: str, shift: int) -> list[int]:
        statuses = []
        for i in range(len(ids)):
            sid = ids[(i + shift) % len(ids)]
            r = await c.post("/api/labels", json=label(sid, who, COLORS[i % 3], CLARITIES[(i + shift) % 3]))
            statuses.append(r.status)
        return statuses

    async def scenario(c: TestClient) -> tuple[list[int], list[int], dict[str, Any]]:
        a, b = await asyncio.gather(annotator(c, "duke", 0), annotator(c, "ann", 11))
        return a, b, await (await c.get("/api/agreement")).json()

    a, b, agreement = run(tmp_path, scenario)
    assert a == b == [201] * len(ids)
    primary = read_labels(tmp_path / "labels.jsonl")
    checks = [json.loads(x) for x in (tmp_path / "review" / "checks.jsonl").read_text().splitlines()]
    assert sorted(lab.stone_id for lab in primary) == sorted(ids)  # every stone once in labels.jsonl
    assert len(checks) == len(ids) and {c["check"] for c in checks} == {"second"}
    lines = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    written = {(x["stone_id"], x["annotator"]) for x in lines}
    assert written | {(c["stone_id"], c["annotator"]) for c in checks} == {(s, w) for s in ids for w in ("duke", "ann")}
    (pair,) = agreement["pairs"]
    assert pair["stones"] == len(ids) and pair["kappa_color"] is not None and pair["kappa_clarity"] is not None


def test_kappa_matches_the_definition() -> None:
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    # p_o = 0.5, p_e = 0.5: chance agreement only
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == 0.0
    # sklearn's worked example: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    a = ["y"] * 5 + ["n"] * 5
    b = ["y", "y", "y", "y", "n", "y", "y", "n", "n", "n"]
    assert cohen_kappa(a, b) == pytest.approx(((7 / 10) - (5 * 6 + 5 * 4) / 100) / (1 - 0.5))
    assert cohen_kappa(["a"], ["b"]) is None


def test_gold_set_is_shown_blind_to_a_second_annotator_and_kappa_is_computed(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 10)
    store = LabelStore(tmp_path)
    truth = {sid: (COLORS[i % 3], CLARITIES[i % 2]) for i, sid in enumerate(ids)}
    for sid in ids:
        store.add(label(sid, "duke", *truth[sid]))
    assert store.queue("ann", 100) == []  # nothing left to label: everything is labelled
    gold = store.make_gold(size=6, seed=1)
    assert store.make_gold(size=6, seed=2) == gold  # chosen once and stored
    shown = store.queue("ann", 100, mode="gold")
    assert sorted(q["stone_id"] for q in shown) == gold["stone_ids"]
    assert all("color" not in q and "annotator" not in q for q in shown)  # blind
    for n, sid in enumerate(gold["stone_ids"]):
        color, clarity = truth[sid]
        store.add(label(sid, "ann", "inky" if n == 0 and color != "inky" else color, clarity))
    (pair,) = store.agreement()["pairs"]
    assert pair["gold_stones"] == 6 and [d["stone_id"] for d in pair["disagreements"]] == gold["stone_ids"][:1]
    assert pair["kappa_clarity"] == 1.0 and pair["kappa_color"] is not None and pair["kappa_color"] < 1.0
    assert store.queue("ann", 100, mode="gold") == []
    assert effective_labels(tmp_path) == read_labels(tmp_path / "labels.jsonl")  # duke's stay the ground truth


def test_spot_round_reports_disagreement_above_ten_percent(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 12)
    store = LabelStore(tmp_path)
    for sid in ids:
        store.add(label(sid, "duke", "blue", "opaque"))
    spot = store.make_spot("duke", size=10, seed=3)
    assert {q["stone_id"] for q in store.queue("duke", 100, mode="spot")} == set(spot["stone_ids"])
    for n, sid in enumerate(spot["stone_ids"]):
        store.add(label(sid, "duke", "light" if n < 2 else "blue", "opaque", check="spot"))
    report = store.spot_report()
    assert report["relabelled"] == 10 and report["disagreement"] == pytest.approx(0.2) and report["investigate"]
    assert len(read_labels(tmp_path / "labels.jsonl")) == len(ids)  # re-labels never replace the labels
    assert store.make_spot("duke", size=10, seed=4)["round"] != spot["round"]
    assert store.spot_report()["relabelled"] == 0  # a new round starts from nothing


def test_retrain_endpoints_answer_503_while_the_module_is_absent(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    flagged_dataset(tmp_path, 1)
    import sys

    monkeypatch.setitem(sys.modules, "sorterd.trainer.retrain", None)  # as if not installed

    async def scenario(c: TestClient) -> list[tuple[int, dict[str, Any]]]:
        return [(r.status, await r.json()) for r in (await c.get("/api/retrain"), await c.post("/api/retrain"))]

    for status, answer in run(tmp_path, scenario):
        assert status == 503 and "sorterd.trainer.retrain" in answer["error"]
    assert not os.path.exists(tmp_path / "models")


def test_two_processes_on_one_dataset_see_each_others_labels(tmp_path: Path) -> None:
    ids = flagged_dataset(tmp_path, 3)
    a, b = LabelStore(tmp_path), LabelStore(tmp_path)  # e.g. `sorterd review` beside `sorterd trainer`
    a.add(label(ids[0], "duke"))
    with pytest.raises(LabelError, match="already labelled by duke") as exc:
        b.add(label(ids[0], "duke", color="inky"))
    assert exc.value.status == 409
    assert b.add(label(ids[0], "ann"))["check"] == "second"  # b read a's line before deciding
    assert b.undo("duke")["stone_id"] == ids[0]  # and can withdraw it
    assert {q["stone_id"] for q in a.queue("duke", 10)} == set(ids)


def test_the_dataset_reader_checks_retraction_lines(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"stone_id": "a1", "color": "blue", "clarity": "opaque"}\n'
                    '{"stone_id": "a1", "retract": true, "annotator": "duke"}\n'
                    '{"stone_id": "a1", "color": "inky", "clarity": "opaque"}\n'
                    '{"stone_id": "b2", "retract": true}\n'
                    '{"stone_id": "c3", "retract": "yes"}\n')
    with pytest.raises(DatasetError) as exc:
        read_labels(path)
    assert exc.value.problems == [
        f"{path}:4: retracts stone_id 'b2', which has no live label above it; a retraction follows the label "
        "it withdraws",
        f"{path}:5: retract = 'yes': a retraction line has \"retract\": true"]
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    (lab,) = read_labels(path)
    assert (lab.stone_id, lab.color, lab.line) == ("a1", "inky", 3)


def test_each_appended_line_is_applied_once(tmp_path: Path) -> None:
    """The store reads only what was appended (a missing checks.jsonl once made it replay every file
    on every request: O(labels²))."""
    ids = flagged_dataset(tmp_path, 8)
    applied: list[str] = []

    class Counting(LabelStore):
        def _apply(self, file: str, rec: dict[str, Any]) -> None:
            applied.append(rec["stone_id"])
            super()._apply(file, rec)

    store = Counting(tmp_path)
    for sid in ids:
        store.add(label(sid))
        store.queue("duke", 10)
        store.counts()
    store.undo("duke")
    assert sorted(applied) == sorted([*ids, ids[-1]])  # eight labels and one retraction, each applied once


def test_retrain_endpoints_call_the_retrain_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    flagged_dataset(tmp_path, 1)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_log.jsonl").write_text('{"version": "v002"}\n')
    calls: list[tuple[Path, str]] = []
    fake = types.ModuleType("sorterd.trainer.retrain")
    fake.read_status = lambda root: {"state": "training", "epoch": 3, "progress": 0.4}  # type: ignore[attr-defined]
    fake.request_run = lambda root, reason: calls.append((root, reason)) or {"queued": True}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sorterd.trainer.retrain", fake)

    async def scenario(c: TestClient) -> list[tuple[int, Any]]:
        out = []
        for r in (await c.get("/api/retrain"), await c.post("/api/retrain", json={"reason": "button"}),
                  await c.post("/api/retrain", json={"reason": 7}), await c.get("/reports/models/model_log.jsonl"),
                  await c.get("/reports/labels.jsonl"), await c.get("/reports/models/../labels.jsonl")):
            out.append((r.status, await r.text()))
        return out

    answers = run(tmp_path, scenario)
    assert [s for s, _ in answers] == [200, 202, 400, 200, 404, 404]
    assert json.loads(answers[0][1])["epoch"] == 3 and json.loads(answers[1][1]) == {"queued": True}
    assert calls == [(tmp_path, "button")]  # the bad reason reached nothing
    assert "v002" in answers[3][1]


def test_the_page_reads_the_runners_status_as_it_is_written(tmp_path: Path) -> None:
    """The real runner's keys (fraction, reports under DIR/retrain/runs, refused) become what the
    page shows (progress, links it can serve, one message); paths outside the dataset get no link."""
    from sorterd.trainer.review.app import page_status

    root = tmp_path / "ds"
    run = root / "retrain" / "runs" / "r1"
    run.mkdir(parents=True)
    status = {"state": "done", "fraction": 1.0, "refused": ["CUT recall 0.80 < 0.85"],
              "reports": {"report_html": str(run / "report.html"), "train_log": str(run / "train.log"),
                          "evaluate": str(tmp_path / "elsewhere.json")}}
    page = page_status(root, status)
    assert page["progress"] == 1.0 and page["message"] == "not a candidate: CUT recall 0.80 < 0.85"
    assert page["report_url"] == "/reports/retrain/runs/r1/report.html"
    assert page["log_url"] == "/reports/retrain/runs/r1/train.log"
    assert "report_url" not in page_status(root, {"reports": {"evaluate": str(tmp_path / "elsewhere.json")}})
