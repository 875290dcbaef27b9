"""Active learning on the simulator: uncertainty-chosen labels (§5.3) vs the same number chosen at random.

    PYTHONPATH=. python bench/active_learning.py --work /tmp/al --api [--rounds 3] [--pool 200] [--heldout 200]
                                                 [--base 400] [--epochs-heads 2] [--epochs 0] [--seed 1]
                                                 (--direct instead of --api: no review page)

Per round r, for each arm (uncertainty, random) starting from models/default:
  1. a fresh simulated lot the model never saw (`sorterd sim generate`, lot id LOT-AL-P<r>, its own seed);
  2. score every stone with the arm's current model (onnxruntime, as the sorter does) and append it to
     the arm's review queue (DIR/unlabelled.jsonl, the inbox's line: probabilities, §5.3 priority); the
     stones the sorter would flag (§5.2: combined confidence < sort_confidence 0.80) set k;
  3. --api: a real `sorterd review --data <arm's dataset> --port 0` serves the arm for its whole life;
     uncertainty arm: the page's first k (`GET /api/queue`, highest §5.3 priority first, leftovers of
     earlier rounds included, as on the trainer); random arm: k at random from the same queue;
  4. label them with the simulator's truth through `POST /api/labels` (the store appends labels.jsonl);
     `GET /api/counts` must then count every label (none lost).  --direct: appended straight instead;
  5. `sorterd train --from <arm's model>` on the grown dataset (§5.4): a base lot of --base labelled stones
     (LOT-AL-B, standing in for the shipped model's training data) + the arm's labels so far (+ the
     held-out lot as test lot; fine-tuning on the ~15 flagged stones alone collapses the model: 17 %),
     heads-only by default (an end-to-end epoch of 400 stones took ~170 s on the loaded 2-core box);
     evaluate on the held-out lot (a lot neither model trained on): overall, colour, clarity,
     cost-weighted, flagged rate.
  6. at the end, `sorterd compare` of the two arms' last models on the held-out lot (paired bootstrap:
     is the difference more than the noise of 200 stones?).
Writes WORK/results.json, WORK/active_learning.png and a markdown table on stdout for bench/RESULTS.md.
Small by design (2 busy cores): a few hundred stones a round, heads-only fine-tuning.  --seed changes the lots,
the random arm's draw and training's seed (run two seeds to see the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEYS = ("overall", "color", "clarity", "cost_weighted", "flagged_rate")
MAX_QUEUE = 1000  # the page's limit


def sorterd(*args: str | Path, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "sorterd", *(str(a) for a in args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log or os.devnull, "a") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}; see {log}")


def post_label(api: str, label: dict[str, Any]) -> dict[str, Any]:
    """The review page's agreed API: POST /api/labels -> 201 with the stored §3.4 line."""
    body = {"stone_id": label["stone_id"], "annotator": "simulator-truth", "color": label["color"],
            "clarity": label["clarity"], "uncertain": False, "mixed": False, "damaged": False,
            "reject": bool(label.get("reject")), "notes": "bench/active_learning.py"}
    req = urllib.request.Request(f"{api}/api/labels", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status != 201:
            raise SystemExit(f"POST /api/labels: {resp.status}")
        return dict(json.loads(resp.read()))


def priority(pc: list[float], pk: list[float]) -> float:
    from sorterd.domain import uncertainty_score
    from sorterd.trainer.inbox import _BOOST, priority_boosts

    conf = min(max(pc), max(pk))
    rec = SimpleNamespace(p_color=pc, p_clarity=pk, confidence=conf)
    return uncertainty_score(pc, pk) + sum(_BOOST[b] for b in priority_boosts(rec))  # type: ignore[arg-type]


def score(bundle: Path, data: Path) -> list[tuple[dict[str, Any], list[float], list[float], float, float]]:
    """(label line, p_color, p_clarity, §5.3 priority, combined confidence) for every stone of `data`."""
    from sorterd.data.dataset import open_dataset
    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.evaluate import predict

    ds = open_dataset(data)
    got = predict(OnnxModel(bundle, threads=2), ds, ds.labels, source="processed")  # one row per label line
    pc, pk = got.p_color, got.p_clarity
    lines = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines() if x.strip()]
    return [(line, [float(v) for v in c], [float(v) for v in k], priority(list(c), list(k)), float(min(c.max(), k.max())))
            for line, c, k in zip(lines, pc, pk, strict=True)]


def link_dataset(root: Path, images_from: Path, lines: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "images").exists():
        (root / "images").symlink_to(images_from / "images")
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def evaluate(bundle: Path, heldout: Path, out: Path, log: Path) -> dict[str, float]:
    sorterd("evaluate", "--model", bundle, "--data", heldout, "--split", "all", "--json", out, log=log)
    m = json.loads(out.read_text())
    return {k: m[k] for k in KEYS}


def start_review(data: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`sorterd review --data DATA --port 0` as a child; (process, base URL) once it listens."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sorterd", "review", "--data", str(data), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        with open(log, "a") as fh:
            fh.write(line)
        m = re.search(r"(http://[0-9.]+:[0-9]+)/", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"sorterd review on {data} exited {proc.wait()} before listening; see {log}")


def get_json(api: str, path: str) -> Any:
    with urllib.request.urlopen(f"{api}{path}", timeout=30) as resp:
        return json.loads(resp.read())


def queue_line(line: dict[str, Any], pc: list[float], pk: list[float], prio: float, conf: float) -> dict[str, Any]:
    """The inbox's unlabelled.jsonl fields the page uses (no truth in it: the page is blind)."""
    return {"stone_id": line["stone_id"], "lot_id": line.get("lot_id", ""), "session_id": line.get("session_id", ""),
            "size_mm": line.get("size_mm"), "p_color": pc, "p_clarity": pk, "priority": round(prio, 6),
            "confidence": conf}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=0, help="end-to-end epochs per round (default 0: heads only)")
    ap.add_argument("--epochs-heads", type=int, default=2, help="heads-only epochs per round (default 2)")
    ap.add_argument("--base", type=int, default=400,
                    help="labelled stones every arm trains on besides its new labels (a stand-in for the shipped "
                         "model's training data, which is not shipped); 0: the new labels alone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lot", default="thai-mixed")
    ap.add_argument("--api", action="store_true", help="label through a `sorterd review` page it starts")
    ap.add_argument("--direct", action="store_true", help="append labels straight to labels.jsonl")
    a = ap.parse_args()
    if a.api == a.direct:
        ap.error("give one of --api (a sorterd review page per arm) or --direct")
    work, log = a.work, a.work / "bench.log"
    work.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.monotonic(), os.times()
    store = work / "store"  # one dataset holds every generated stone (ids continue; images shared)
    base_seed = 900 + 100 * a.seed
    if not (store / "labels.jsonl").exists():
        sorterd("sim", "generate", "--out", store, "--stones", a.heldout, "--lot", a.lot, "--lot-id", "LOT-AL-H",
                "--seed", base_seed, log=log)
        for r in range(1, a.rounds + 1):
            sorterd("sim", "generate", "--out", store, "--stones", a.pool, "--lot", a.lot, "--lot-id",
                    f"LOT-AL-P{r}", "--seed", base_seed + r, log=log)
    every = [json.loads(x) for x in (store / "labels.jsonl").read_text().splitlines() if x.strip()]
    if a.base and not any(x["lot_id"] == "LOT-AL-B" for x in every):
        sorterd("sim", "generate", "--out", store, "--stones", a.base, "--lot", a.lot, "--lot-id", "LOT-AL-B",
                "--seed", base_seed + 50, log=log)
        every = [json.loads(x) for x in (store / "labels.jsonl").read_text().splitlines() if x.strip()]
    known = [x for x in every if x["lot_id"] in ("LOT-AL-H", "LOT-AL-B")]  # in labels.jsonl from the start
    truth = {x["stone_id"]: x for x in every}
    held = [x for x in every if x["lot_id"] == "LOT-AL-H"]
    heldout = work / "heldout"
    link_dataset(heldout, store, held)
    base = REPO / "models" / "default"
    rows: list[dict[str, Any]] = [{"round": 0, "arm": "shipped", "labels": 0,
                                   **evaluate(base, heldout, work / "eval-0.json", log)}]
    for arm in ("uncertainty", "random"):
        model, chosen = base, []
        rng = random.Random(a.seed * 7919 + 7)
        ds = work / arm / "ds"
        link_dataset(ds, store, known)  # the held-out lot (every run's test lot) and the base training lot
        (ds / "unlabelled.jsonl").write_text("")
        proc, api = start_review(ds, log) if a.api else (None, "")
        try:
            for r in range(1, a.rounds + 1):
                pool = work / arm / f"pool{r}"
                link_dataset(pool, store, [x for x in every if x["lot_id"] == f"LOT-AL-P{r}"])
                scored = score(model, pool)
                k = sum(1 for *_, conf in scored if conf < 0.80)  # what the sorter flags (§5.2 sort_confidence)
                with open(ds / "unlabelled.jsonl", "a") as fh:
                    fh.write("".join(json.dumps(queue_line(*s)) + "\n" for s in scored))
                if a.api:
                    queue = get_json(api, f"/api/queue?annotator=simulator-truth&limit={MAX_QUEUE}")["items"]
                    ids = [q["stone_id"] for q in queue]
                    picked_ids = ids[:k] if arm == "uncertainty" else rng.sample(ids, min(k, len(ids)))
                    picked = [truth[s] for s in picked_ids]
                    for lab in picked:
                        post_label(api, lab)
                    chosen += picked
                    counted = get_json(api, "/api/counts")["labelled"]
                    if counted != len(known) + len(chosen):
                        raise SystemExit(f"the page counts {counted} labels, {len(known) + len(chosen)} expected")
                else:
                    ranked = sorted(scored, key=lambda s: -s[3]) if arm == "uncertainty" else \
                        rng.sample(scored, len(scored))
                    picked = [s[0] for s in ranked[:k]]
                    chosen += picked
                    link_dataset(ds, store, known + chosen)
                out = work / arm / "models" / f"v{r + 2:03d}"
                sorterd("train", "--data", ds, "--out", out, "--from", model, "--test-lots", "LOT-AL-H", "--force",
                        "--epochs-heads", a.epochs_heads, "--epochs", a.epochs, "--batch-size", 32, "--threads", a.threads,
                        "--seed", a.seed, "--no-progress", log=log)
                model = out
                rows.append({"round": r, "arm": arm, "labels": len(chosen), "picked": k, "model": str(out),
                             **evaluate(model, heldout, work / f"eval-{arm}-{r}.json", log)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    finals = {x["arm"]: x["model"] for x in rows if x.get("model")}  # the last round's model per arm
    comparison = compare(Path(finals["random"]), Path(finals["uncertainty"]), heldout, work / "compare-final.json", log)
    print(f"held-out, paired: random (old) vs uncertainty (new): {comparison['verdict']}", flush=True)
    cpu1 = os.times()
    result = {"rows": rows, "pool": a.pool, "base": a.base, "heldout": a.heldout, "epochs": a.epochs, "epochs_heads": a.epochs_heads, "lot": a.lot, "seed": a.seed,
              "labelled_via": "sorterd review POST /api/labels" if a.api else "direct append",
              "final_comparison": {k: comparison.get(k) for k in ("verdict", "better", "cost_weighted_delta",
                                                                  "cost_weighted_delta_ci95", "n_stones")},
              "seconds": round(time.monotonic() - started),
              "cpu_seconds_children": round(cpu1.children_user + cpu1.children_system
                                            - cpu0.children_user - cpu0.children_system),
              "load_average": os.getloadavg()}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, work / "active_learning.png")
    print(table(rows))
    return 0


def compare(old: Path, new: Path, heldout: Path, out: Path, log: Path) -> dict[str, Any]:
    """`sorterd compare OLD NEW` on every held-out stone: the paired bootstrap of cost-weighted accuracy."""
    sorterd("compare", old, new, "--data", heldout, "--split", "all", "--json", out, log=log)
    return dict(json.loads(out.read_text()))


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| round | arm | labels | overall | colour | clarity | cost-weighted | flagged |", "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['round']} | {x['arm']} | {x['labels']} | " + " | ".join(f"{x[k]:.3f}" for k in KEYS) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for arm in ("uncertainty", "random"):
        pts = [rows[0]] + [x for x in rows if x["arm"] == arm]
        axes[0].plot([p["labels"] for p in pts], [p["cost_weighted"] for p in pts], marker="o", label=arm)
        axes[1].plot([p["labels"] for p in pts], [p["flagged_rate"] for p in pts], marker="o", label=arm)
    axes[0].set(xlabel="labels added", ylabel="held-out cost-weighted accuracy")
    axes[1].set(xlabel="labels added", ylabel="held-out flagged rate")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
