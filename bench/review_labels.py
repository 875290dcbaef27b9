"""Review page: time per label through the HTTP API (POST /api/labels: validate, append, fsync) and
per queue request, on a dataset the trainer inbox wrote (issue 11).

    python bench/review_labels.py --stones 300 [--history 20000] [--dir DIR]

--history: that many earlier label lines (other stones) already in labels.jsonl, to show the cost
per label does not grow with the file (the store applies appended lines incrementally) and what
opening the store costs.  Prints p50 / p99 in ms; the §3.1 budget is ~2 s a stone for the person.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from sorterd.trainer.review.app import make_app  # noqa: E402
from tests.reviewdata import flagged_dataset  # noqa: E402


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(root: Path, ids: list[str]) -> dict[str, list[float]]:
    t = time.perf_counter()
    app = make_app(root)
    out: dict[str, list[float]] = {"open": [1000 * (time.perf_counter() - t)], "queue": [], "label": []}
    async with TestClient(TestServer(app)) as c:
        for i, sid in enumerate(ids):
            t = time.perf_counter()
            r = await c.get("/api/queue", params={"annotator": "duke", "limit": "50"})
            await r.json()
            out["queue"].append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            r = await c.post("/api/labels", json={"stone_id": sid, "annotator": "duke", "color": "blue",
                                                  "clarity": ("transparent", "opaque")[i % 2]})
            assert r.status == 201, await r.text()
            out["label"].append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stones", type=int, default=300)
    ap.add_argument("--history", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="where the temp dataset goes (default: the system temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        ids = flagged_dataset(root, args.stones)
        with open(root / "labels.jsonl", "a") as f:
            for n in range(args.history):
                f.write(json.dumps({"stone_id": f"OLD{n:07d}", "color": "blue", "clarity": "opaque",
                                    "annotator": "duke", "timestamp": "2026-01-01T10:00:00+07:00"}) + "\n")
        out = asyncio.run(run(root, ids))
    print(f"{args.stones} stones, {args.history} earlier label lines; open {out['open'][0]:.0f} ms")
    for name in ("queue", "label"):
        xs = out[name]
        print(f"{name:6s} p50 {quantile(xs, 0.5):6.2f} ms  p99 {quantile(xs, 0.99):6.2f} ms  (n={len(xs)})")


if __name__ == "__main__":
    main()
