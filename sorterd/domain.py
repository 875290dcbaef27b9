"""The domain's words, shared by the sorter, the trainer and the simulator.

Classes (§1.3, §3.2), bins and the §8.2 mapping and cost matrix, the two
lighting modes of a frame pair (§2.2), and the §3.4 annotation flags.  Config
sections, stages and tools import these names from here; nothing here depends
on anything else in sorterd.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

BINS = ("CUT", "SELECT", "FLIP", "REJECT")
JET_BINS = ("CUT", "SELECT", "FLIP")  # REJECT is the default trajectory: no jet
LIGHT_MODES = ("backlit", "toplit")  # a pair's two strobes, in order (§2.2)
COLORS = ("blue", "light", "inky")  # the colour head's classes, in output order
CLARITIES = ("transparent", "translucent", "opaque")  # the clarity head's classes
CLASSES = tuple(f"{c}_{k}" for c in COLORS for k in CLARITIES)  # the 9 §1.3 classes
FLAGS = ("uncertain", "mixed", "damaged", "reject")  # §3.2.3 / §3.4 annotation flags

# §8.2 decision mapping (CUT additionally needs size >= decision.cut_min_size_mm).
DEFAULT_BINS: dict[str, dict[str, str]] = {
    "blue": {"transparent": "CUT", "translucent": "FLIP", "opaque": "FLIP"},
    "light": {"transparent": "SELECT", "translucent": "FLIP", "opaque": "FLIP"},
    "inky": {"transparent": "SELECT", "translucent": "SELECT", "opaque": "REJECT"},
}

# §8.2 cost matrix, COST[true][landed], bins in BINS order (CUT, SELECT, FLIP, REJECT).
COST = np.array([
    [0, 3, 10, 8],
    [5, 0, 3, 4],
    [7, 1, 0, 2],
    [1, 1, 1, 0],
])


def cost_weighted_accuracy(true_bins: list[str], got_bins: list[str]) -> float:
    """§8.2: 1 - total cost / worst possible cost for these stones."""
    if not true_bins:
        return float("nan")
    t = [BINS.index(b) for b in true_bins]
    g = [BINS.index(b) for b in got_bins]
    total = sum(COST[i, j] for i, j in zip(t, g, strict=True))
    worst = sum(COST[i].max() for i in t)
    return 1.0 - total / worst


def uncertainty_score(p_color: npt.ArrayLike, p_clarity: npt.ArrayLike) -> float:
    """§5.3: the mean normalised entropy of the two heads, in [0, 1] (higher = more worth a label).

    Each head's entropy (base 2, probabilities clipped at 1e-10) over log2(3), averaged:
    [1/3, 1/3, 1/3] on both heads gives 1.0, a one-hot pair gives 0.0."""
    def entropy(p: npt.ArrayLike) -> float:
        q = np.clip(np.asarray(p, dtype=np.float64), 1e-10, 1.0)
        return float(-np.sum(q * np.log2(q)))

    score = (entropy(p_color) + entropy(p_clarity)) / (2 * np.log2(3))
    return float(min(1.0, max(0.0, score)))
