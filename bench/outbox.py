"""Outbox throughput: what the caller pays per submit, and how many records/s reach the disk.

    python bench/outbox.py [--records 200] [--dir /tmp/outbox-bench]

Records as the pipeline makes them: two 128x128 crops and the pair's two 640x240 frames
(channel-like content: a flat backlight with sensor noise and a few dark stones), PNG-encoded
by the outbox thread and committed one per transaction (WAL, synchronous=FULL).  Reports the
submit call's cost on the caller (p50/p99, the event loop's share), durable records/s and
MB/s, pending() and acknowledged() rates.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sorterd.link.outbox import Outbox
from sorterd.link.records import StoneRecord


def frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w, 3), 210, np.uint8)
    img += rng.integers(0, 5, img.shape, dtype=np.uint8)  # sensor noise (sim camera.noise_sigma ~2)
    for _ in range(3):
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        img[y:y + 40, x:x + 40] = rng.integers(20, 90, 3, dtype=np.uint8)
    return img


def record(i: int) -> StoneRecord:
    return StoneRecord("bench", "b", f"S{i:06d}", "s", "", "t", "v", (0.5, 0.3, 0.2), (0.6, 0.3, 0.1),
                       "FLIP", "FLIP", 0.5, 2.0, 0.8, "flagged", 20.0, 6.4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    shutil.rmtree(where, ignore_errors=True)
    rng = np.random.default_rng(1)
    pool = [{"backlit_crop": frame(rng, 128, 128), "toplit_crop": frame(rng, 128, 128),
             "backlit_full": frame(rng, 240, 640), "toplit_full": frame(rng, 240, 640)} for _ in range(8)]
    box = Outbox(where, 10**11, queue_size=args.records + 1)
    calls, futs = [], []
    t0 = time.perf_counter()
    for i in range(args.records):
        t = time.perf_counter()
        futs.append(box.submit_stone(record(i), pool[i % len(pool)]))
        calls.append(time.perf_counter() - t)
    assert all(f is not None and f.result() for f in futs)
    wall = time.perf_counter() - t0
    entries, size = box.depth()
    t = time.perf_counter()
    got = 0
    while batch := box.pending(16, frozenset()):
        got += len(batch)
        for r in batch:
            box.acknowledged(r.key)
    drain = time.perf_counter() - t
    box.close()
    us = np.array(calls) * 1e6
    print(f"records {args.records}, {size / entries / 1e3:.0f} kB each (PNG)")
    print(f"submit on the caller: p50 {np.percentile(us, 50):.0f} us, p99 {np.percentile(us, 99):.0f} us")
    print(f"durable: {args.records / wall:.1f} records/s, {size / wall / 1e6:.1f} MB/s (encode + insert + fsync)")
    print(f"pending(16) + acknowledged: {got / drain:.0f} records/s")
    shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
