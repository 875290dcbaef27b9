"""Active learning on the simulator: uncertainty-chosen labels (§5.3) vs the same number chosen at random.

    PYTHONPATH=. python bench/active_learning.py --work /tmp/al [--rounds 2] [--pool 300] [--heldout 200]
                                                 [--epochs 2] [--api http://127.0.0.1:8765 | --direct]

Per round r, for each arm (uncertainty, random) starting from models/default:
  1. a fresh simulated lot the model never saw (`sorterd sim generate`, lot id LOT-AL-P<r>, its own seed);
  2. score every stone with the arm's current model (onnxruntime, as the sorter does); the stones the
     sorter would flag (§5.2: combined confidence < sort_confidence) set k;
  3. uncertainty arm: the k highest §5.3 priorities (entropy + the inbox's boosts); random arm: k at random;
  4. label them with the simulator's truth -- through the review page's `POST /api/labels` (--api), or
     appended straight to the arm's labels.jsonl (--direct: the review page is not on this branch);
  5. `sorterd train --from <arm's model>` on the arm's labels so far (+ the held-out lot as test lot),
     few epochs; evaluate on the held-out lot (a lot neither model trained on): overall, colour, clarity,
     cost-weighted, flagged rate.
Writes WORK/results.json, WORK/active_learning.png and a markdown table on stdout for bench/RESULTS.md.
Small by design (2 busy cores): a few hundred stones a round, a few epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEYS = ("overall", "color", "clarity", "cost_weighted", "flagged_rate")


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


def score(bundle: Path, data: Path) -> list[tuple[dict[str, Any], float, float]]:
    """(label line, §5.3 priority, combined confidence) for every stone of `data`."""
    from sorterd.data.dataset import open_dataset
    from sorterd.parts.inference.onnxruntime import OnnxModel
    from sorterd.train.evaluate import predict

    ds = open_dataset(data)
    pc, pk = predict(OnnxModel(bundle, threads=2), ds, ds.labels)
    lines = [json.loads(x) for x in (data / "labels.jsonl").read_text().splitlines() if x.strip()]
    return [(line, priority(list(c), list(k)), float(min(c.max(), k.max()))) for line, c, k in zip(lines, pc, pk, strict=True)]


def link_dataset(root: Path, images_from: Path, lines: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "images").exists():
        (root / "images").symlink_to(images_from / "images")
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def evaluate(bundle: Path, heldout: Path, out: Path, log: Path) -> dict[str, float]:
    sorterd("evaluate", "--model", bundle, "--data", heldout, "--split", "all", "--json", out, log=log)
    m = json.loads(out.read_text())
    return {k: m[k] for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lot", default="thai-mixed")
    ap.add_argument("--api", help="review page base URL (POST /api/labels)")
    ap.add_argument("--direct", action="store_true", help="append labels straight to labels.jsonl")
    a = ap.parse_args()
    if not a.api and not a.direct:
        ap.error("give --api URL (the review page) or --direct")
    work, log = a.work, a.work / "bench.log"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    store = work / "store"  # one dataset holds every generated stone (ids continue; images shared)
    if not (store / "labels.jsonl").exists():
        sorterd("sim", "generate", "--out", store, "--stones", a.heldout, "--lot", a.lot, "--lot-id", "LOT-AL-H",
                "--seed", 900, log=log)
        for r in range(1, a.rounds + 1):
            sorterd("sim", "generate", "--out", store, "--stones", a.pool, "--lot", a.lot, "--lot-id",
                    f"LOT-AL-P{r}", "--seed", 900 + r, log=log)
    every = [json.loads(x) for x in (store / "labels.jsonl").read_text().splitlines() if x.strip()]
    held = [x for x in every if x["lot_id"] == "LOT-AL-H"]
    heldout = work / "heldout"
    link_dataset(heldout, store, held)
    base = REPO / "models" / "default"
    rows: list[dict[str, Any]] = [{"round": 0, "arm": "shipped", "labels": 0,
                                   **evaluate(base, heldout, work / "eval-0.json", log)}]
    for arm in ("uncertainty", "random"):
        model, chosen = base, []
        rng = random.Random(7)
        for r in range(1, a.rounds + 1):
            pool = work / arm / f"pool{r}"
            link_dataset(pool, store, [x for x in every if x["lot_id"] == f"LOT-AL-P{r}"])
            scored = score(model, pool)
            k = sum(1 for _, _, conf in scored if conf < 0.80)  # what the sorter flags (§5.2 sort_confidence)
            ranked = sorted(scored, key=lambda s: -s[1]) if arm == "uncertainty" else rng.sample(scored, len(scored))
            picked = [s[0] for s in ranked[:k]]
            if a.api:
                for lab in picked:
                    post_label(a.api, lab)
            chosen += picked
            ds = work / arm / "ds"
            link_dataset(ds, store, held + chosen)  # --direct: the labels appended as lines
            out = work / arm / "models" / f"v{r + 2:03d}"
            sorterd("train", "--data", ds, "--out", out, "--from", model, "--test-lots", "LOT-AL-H", "--force",
                    "--epochs-heads", 1, "--epochs", a.epochs, "--batch-size", 32, "--threads", 2, "--no-progress",
                    log=log)
            model = out
            rows.append({"round": r, "arm": arm, "labels": len(chosen), "picked": k,
                         **evaluate(model, heldout, work / f"eval-{arm}-{r}.json", log)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "pool": a.pool, "heldout": a.heldout, "epochs": a.epochs, "lot": a.lot,
              "labelled_via": a.api or "direct append", "seconds": round(time.monotonic() - started)}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, work / "active_learning.png")
    print(table(rows))
    return 0


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
