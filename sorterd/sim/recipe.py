"""How the shipped default model's dataset is made: lots, sizes, seeds, dates.

Used by `models/build_default.py` (rebuilds models/default) and
`bench/train_time.py` (times training at the §1.1 Phase 2 size), so both
describe the same data.  Five training lots, 4,500 stones (the Phase 2
size, train + validation), plus two whole lots held out for test (§7.4):

    thai-mixed 1000, pailin-heated 900, bo-ploi-dark 900, ilakaka-pale 900,
    ratnapura-worn 800  -> train/val
    anakie-dark 600, chanthaburi-fine 600  -> test (never seen in training)

The same as shell commands: models/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sorterd import config
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import get_lot


@dataclass(frozen=True)
class LotBatch:
    lot: str
    stones: int
    seed: int
    day: str


DEFAULT_LOTS: tuple[LotBatch, ...] = (
    LotBatch("thai-mixed", 1000, 1, "2026-03-02"),
    LotBatch("pailin-heated", 900, 2, "2026-03-03"),
    LotBatch("bo-ploi-dark", 900, 3, "2026-03-04"),
    LotBatch("ilakaka-pale", 900, 4, "2026-03-05"),
    LotBatch("ratnapura-worn", 800, 5, "2026-03-06"),
    LotBatch("anakie-dark", 600, 6, "2026-03-09"),
    LotBatch("chanthaburi-fine", 600, 7, "2026-03-10"),
)
TEST_LOTS = ("LOT-2026-006", "LOT-2026-007")
TRAIN_SEED = 0


def generate_default_dataset(out: Path, progress: Callable[[str], None] | None = None) -> int:
    """Write the whole dataset into out (which should be empty); returns the stones written."""
    from sorterd.cli.compose import load_config

    cfg = load_config(config.sim_config_path())
    total = 0
    for b in DEFAULT_LOTS:
        opts = GenerateOptions(out=out, stones=b.stones, lot=get_lot(b.lot), seed=b.seed,
                               day=date.fromisoformat(b.day))
        total += generate(cfg, opts, progress).stones
    return total
