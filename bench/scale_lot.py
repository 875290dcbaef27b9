"""One simulated lot at a chosen scale, nominal otherwise: how the model holds up at a px/mm its
training lots never had (they stop at 40: rendering costs ~(px/mm)^2).

    python bench/scale_lot.py --ppm 80 --out /tmp/ppm80 [--stones 300]
    sorterd evaluate --model models/default --data /tmp/ppm80 --split all

The same stones (lot chanthaburi-fine's look, seed 77) at any --ppm, so two scales compare stone
for stone.  Figures: models/README.md (v005, "Scale").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import MachineRanges, get_lot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppm", type=float, required=True, help="pixels per mm (8..120)")
    ap.add_argument("--out", type=Path, required=True, help="dataset folder to write (must not exist)")
    ap.add_argument("--stones", type=int, default=300)
    args = ap.parse_args()
    if args.out.exists():
        print(f"{args.out}: exists; give a new folder", file=sys.stderr)
        return 2
    lot = replace(get_lot("chanthaburi-fine"), machine=MachineRanges(px_per_mm=(args.ppm, args.ppm)))
    t0 = time.perf_counter()
    got = generate(load_config(config.sim_config_path()),
                   GenerateOptions(out=args.out, stones=args.stones, lot=lot, seed=77, session_stones=args.stones,
                                   day=date(2026, 3, 12)), lambda s: print(s, flush=True))
    print(f"{args.out}: {got.stones} stones at {args.ppm:g} px/mm in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
