"""Trainer inbox: `Inbox.store` time per record on this disk (issue 10).

    python bench/inbox_store.py --records 200 [--dir DIR]

A typical stone record: two 128x128 crops and two 640x240 frames (PNG, ~20 KB and ~190 KB),
one session record first.  Each store writes four files (temp + fsync + rename), fsyncs their
four folders and appends + fsyncs the queue line: nine fsyncs.  Prints the median and p99 of
store() for new records, and for the same records sent again (duplicates: no I/O).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sorterd.link.records import STONE_IMAGES  # noqa: E402
from sorterd.trainer.inbox import _check_images, open_inbox  # noqa: E402
from tests.inbox_records import session, stone  # noqa: E402


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--dir", type=Path, help="inbox folder (default: a new temp folder, removed after)")
    args = ap.parse_args()
    records = [stone(n) for n in range(1, args.records + 1)]
    size = sum(len(b) for b in records[0].images.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        inbox = open_inbox(Path(tmp) / "data")
        inbox.store("press1", session())
        new, dup = [], []
        for rec in records:
            t = time.perf_counter()
            assert inbox.store("press1", rec).status == "stored"
            new.append(time.perf_counter() - t)
        for rec in records:
            t = time.perf_counter()
            assert inbox.store("press1", rec).status == "duplicate"
            dup.append(time.perf_counter() - t)
        inbox.close()
    checks = []
    for rec in records:
        t = time.perf_counter()
        _check_images(rec.images, STONE_IMAGES)
        checks.append(time.perf_counter() - t)
    print(f"{args.records} records of {size / 1e3:.0f} KB: store p50 {statistics.median(new) * 1e3:.2f} ms, "
          f"p99 {quantile(new, 0.99) * 1e3:.2f} ms, max {max(new) * 1e3:.2f} ms; "
          f"of which decoding the 4 PNGs p50 {statistics.median(checks) * 1e3:.2f} ms; "
          f"duplicate p50 {statistics.median(dup) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
