"""Where the samples of a `py-spy record -f raw` profile went, by part of the process.

    py-spy record -r 250 -f raw -o prof.txt -- python bench/sweep.py --one roi800 --rates 20 \
        --stones 200 --out-dir /tmp/x
    python bench/pyspy_summary.py prof.txt        # a Markdown table for bench/RESULTS.md

Each collapsed stack counts for the first category whose marker it contains (in this
order: the simulator's look building first, as it runs inside a camera grab).  py-spy
samples Python stacks: time a worker spends in OpenCV or onnxruntime with the GIL released
may be sampled as idle, so read the simulator's and the recorder's share, not the stages'.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

CATEGORIES: list[tuple[str, str]] = [
    ("simulator: stone looks (render._build_looks)", "_build_looks"),
    ("simulator: frame render", "render_frame"), ("calibration", "for_run (sorterd/calibration"),
    ("segment", "segment_pair"), ("crop", "crop_halves"), ("model session.run", "predict_halves"),
    ("decide/plan", "_decide_and_plan"), ("recorder (sqlite, thumbnails, images)", "sorterd/sorting/record.py"),
    ("model load", "OnnxModel.__init__"),
]


def summarize(path: Path) -> tuple[collections.Counter[str], int]:
    totals: collections.Counter[str] = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        n += c
        name = next((name for name, key in CATEGORIES if key in stack), "other (event loop, imports, truth)")
        totals[name] += c
    return totals, n


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python bench/pyspy_summary.py PROFILE.txt (py-spy record -f raw)", file=sys.stderr)
        return 2
    totals, n = summarize(Path(sys.argv[1]))
    print("| part | samples | share |\n|---|---:|---:|")
    for name, c in totals.most_common():
        print(f"| {name} | {c} | {100 * c / max(n, 1):.1f} % |")
    print(f"| total | {n} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
