"""How the shipped default model's dataset is made: lots, sizes, seeds, dates.

Used by `models/build_default.py` (rebuilds models/default) and
`bench/train_time.py` (times training at the §1.1 Phase 2 size), so both
describe the same data.  Five training lots, 4,500 stones (the Phase 2
size, train + validation), plus two whole lots held out for test (§7.4).
Since v003 the training lots are domain-randomised: every 150 stones are a
new capture session on another machine drawn from `TRAIN_MACHINES` (scale,
LED tint and level, grey card, exposure, focus, noise, gain, texture, crop
framing); the test lots stay on the nominal machine (the same stones v002
was tested on), and `SHIFTED_LOT` is outside every training range at once:

    thai-mixed 1000, pailin-heated 900, bo-ploi-dark 900, ilakaka-pale 900,
    ratnapura-worn 800  -> train/val
    anakie-dark 600, chanthaburi-fine 600  -> test (never seen in training)

The same as shell commands: models/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from sorterd import config
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import Lot, LotLook, MachineRanges, get_lot

# Domain randomisation (v003): every training session is another machine, drawn from these
# ranges (`MachineRanges`).  px/mm stops at 40 of the 15..80 a 5 MP ROI can give: rendering
# and storing frames costs ~(px/mm)^2, and the model sees a fixed 6.4 mm window resampled
# to 128 px (20 px/mm) either way.
TRAIN_MACHINES = MachineRanges(
    px_per_mm=(15.0, 40.0), backlight_level=(190.0, 250.0), backlight_tint=(0.0, 0.06),
    toplit_level=(95.0, 140.0), toplit_tint=(0.0, 0.05), exposure=(0.85, 1.2), blur_mm=(0.0, 0.03),
    noise_dn=(1.5, 3.0), gain=(1.0, 1.25), texture=(0.8, 1.25), framing_mm=(0.0, 0.25),
)
TRAIN_SESSION_STONES = 150  # a new machine every 150 stones: 30 machines over the five lots

# The shifted lot: outside every training range in six ways at once (scale below, backlight
# bluer/redder, darker grey card, blurrier, noisier, rougher stones) and of a look no
# training lot has (violet, pale, frosted).
SHIFTED_MACHINE = MachineRanges(
    px_per_mm=(12.0, 12.0), backlight_level=(225.0, 225.0), backlight_tint=(0.09, 0.09),
    toplit_level=(85.0, 85.0), toplit_tint=(0.0, 0.0), exposure=(1.0, 1.0), blur_mm=(0.04, 0.04),
    noise_dn=(3.2, 3.2), gain=(1.0, 1.0), texture=(1.45, 1.45), framing_mm=(0.0, 0.35),
)
SHIFTED_LOT = replace(get_lot("ilakaka-pale"), name="songea-shifted", lot_id="LOT-2026-008",
                      description="Tanzanian melee on another machine: shifted in six ways at once",
                      origin="Songea (Tanzania), metamorphic",
                      look=LotLook(hue_shift_deg=9.0, sat_scale=0.9, val_shift=0.035, texture_scale=1.3),
                      machine=SHIFTED_MACHINE)
SHIFTED_STONES, SHIFTED_SEED, SHIFTED_DAY = 1400, 8, "2026-03-11"  # 600 to adapt on, 800 to test


@dataclass(frozen=True)
class LotBatch:
    lot: str
    stones: int
    seed: int
    day: str
    randomised: bool = False  # sessions drawn from TRAIN_MACHINES

    def resolve(self) -> Lot:
        lot = get_lot(self.lot)
        return replace(lot, machine=TRAIN_MACHINES) if self.randomised else lot


DEFAULT_LOTS: tuple[LotBatch, ...] = (
    LotBatch("thai-mixed", 1000, 1, "2026-03-02", randomised=True),
    LotBatch("pailin-heated", 900, 2, "2026-03-03", randomised=True),
    LotBatch("bo-ploi-dark", 900, 3, "2026-03-04", randomised=True),
    LotBatch("ilakaka-pale", 900, 4, "2026-03-05", randomised=True),
    LotBatch("ratnapura-worn", 800, 5, "2026-03-06", randomised=True),
    LotBatch("anakie-dark", 600, 6, "2026-03-09"),
    LotBatch("chanthaburi-fine", 600, 7, "2026-03-10"),
)
TEST_LOTS = ("LOT-2026-006", "LOT-2026-007")
TRAIN_SEED = 0
# v005's: `sorterd train`'s own schedule (2 heads-only + up to 14 end-to-end epochs, patience 4),
# the stone statistics' own path to the logits and the CNN features of a quarter of the training
# samples dropped (models/README.md "v005").  v003 had 1 + 5 epochs and neither.
TRAIN_ARGS = ("--backbone-dropout", "0.25")  # the stats path is `sorterd train`'s default since v005


def generate_default_dataset(out: Path, progress: Callable[[str], None] | None = None) -> int:
    """Write the whole dataset into out (which should be empty); returns the stones written."""
    from sorterd.cli.compose import load_config

    cfg = load_config(config.sim_config_path())
    total = 0
    for b in DEFAULT_LOTS:
        opts = GenerateOptions(out=out, stones=b.stones, lot=b.resolve(), seed=b.seed,
                               session_stones=TRAIN_SESSION_STONES if b.randomised else 1500,
                               day=date.fromisoformat(b.day))
        total += generate(cfg, opts, progress).stones
    return total


def generate_shifted_lot(out: Path, progress: Callable[[str], None] | None = None) -> int:
    """The shifted lot (SHIFTED_LOT, 1,400 stones) into out; returns the stones written."""
    from sorterd.cli.compose import load_config

    cfg = load_config(config.sim_config_path())
    opts = GenerateOptions(out=out, stones=SHIFTED_STONES, lot=SHIFTED_LOT, seed=SHIFTED_SEED,
                           session_stones=SHIFTED_STONES, day=date.fromisoformat(SHIFTED_DAY))
    return generate(cfg, opts, progress).stones
