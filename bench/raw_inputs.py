"""How long the trainer's inputs take: cut from raw frames (cold, then from the cache) vs processed crops.

    python bench/raw_inputs.py --data DIR [--stones N] [--lot LOT] [--session-stones K]

Generates N simulated stones into DIR if it has no labels.jsonl, then times
`sorterd.data.samples.load_samples` three ways on every label: source "auto" with an empty cache
(read the raw pairs, segment them as the sorter does, cut), "auto" again (every input from the
cache), and "processed" (the old path, `load_crops`).  Prints one line each: seconds, ms/stone.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.data.dataset import open_dataset
from sorterd.data.samples import load_samples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--stones", type=int, default=400)
    p.add_argument("--lot", default="thai-mixed")
    p.add_argument("--session-stones", type=int, default=200)
    args = p.parse_args()
    if not (args.data / "labels.jsonl").exists():
        from sorterd.sim.generate import GenerateOptions, generate
        from sorterd.sim.lots import get_lot

        generate(load_config(config.sim_config_path()),
                 GenerateOptions(out=args.data, stones=args.stones, lot=get_lot(args.lot), seed=1,
                                 session_stones=args.session_stones))
    ds = open_dataset(args.data)
    n = len(ds.labels)
    cache = Path(tempfile.mkdtemp(prefix="raw_inputs_cache_"))
    try:
        for name, source, where in (("raw, cold cache", "auto", cache), ("raw, warm cache", "auto", cache),
                                    ("processed crops", "processed", None)):
            t = time.perf_counter()
            _, _, report = load_samples(ds, ds.labels, 128, None, source, where)
            s = time.perf_counter() - t
            print(f"{name:<16} {s:7.2f} s  {1e3 * s / n:6.2f} ms/stone  ({report.line('all')})")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
