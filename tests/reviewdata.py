"""A trainer dataset with flagged stones in it, made by the real inbox (for the review page's tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sorterd.trainer.inbox import open_inbox
from tests.inbox_records import session, stone


def flagged_dataset(root: Path, n: int, seed: int = 0) -> list[str]:
    """n flagged stones from two sorters, probabilities varied (so priorities differ); their dataset ids."""
    rng = np.random.default_rng(seed)
    inbox = open_inbox(root)
    try:
        for sorter in ("press1", "press2"):
            assert inbox.store(sorter, session(sorter=sorter)).status == "stored"
        for i in range(n):
            pc, pq = rng.dirichlet([2.0, 2.0, 0.7]), rng.dirichlet([2.0, 1.5, 0.7])
            p_color = (float(pc[0]), float(pc[1]), float(pc[2]))
            p_clarity = (float(pq[0]), float(pq[1]), float(pq[2]))
            rec = stone(i + 1, sorter=("press1", "press2")[i % 2], p_color=p_color, p_clarity=p_clarity,
                        confidence=max(p_color) * max(p_clarity))
            assert inbox.store(rec.sorter_id, rec).status == "stored"
    finally:
        inbox.close()
    return [json.loads(line)["stone_id"] for line in (root / "unlabelled.jsonl").read_text().splitlines()]
