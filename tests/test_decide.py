"""The decision policy (§5.2 gating, §8.2 mapping and size rule), exhaustively."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sorterd.config import DecisionConfig
from sorterd.domain import CLARITIES, COLORS, DEFAULT_BINS
from sorterd.sorting.decide import class_bin, decide, unsortable_reason

CFG = DecisionConfig()

# §8.2 table, written out independently of the config default.
EXPECTED = {
    ("blue", "transparent", True): "CUT", ("blue", "transparent", False): "SELECT",
    ("blue", "translucent", True): "FLIP", ("blue", "translucent", False): "FLIP",
    ("blue", "opaque", True): "FLIP", ("blue", "opaque", False): "FLIP",
    ("light", "transparent", True): "SELECT", ("light", "transparent", False): "SELECT",
    ("light", "translucent", True): "FLIP", ("light", "translucent", False): "FLIP",
    ("light", "opaque", True): "FLIP", ("light", "opaque", False): "FLIP",
    ("inky", "transparent", True): "SELECT", ("inky", "transparent", False): "SELECT",
    ("inky", "translucent", True): "SELECT", ("inky", "translucent", False): "SELECT",
    ("inky", "opaque", True): "REJECT", ("inky", "opaque", False): "REJECT",
}


def probs(index: int, top: float) -> np.ndarray:
    rest = (1.0 - top) / 2.0
    p = np.full(3, rest)
    p[index] = top
    return p


@pytest.mark.parametrize(("color", "clarity", "big"), list(itertools.product(COLORS, CLARITIES, (True, False))))
def test_mapping_every_class_and_size(color: str, clarity: str, big: bool) -> None:
    size = 2.5 if big else 1.5
    d = decide(probs(COLORS.index(color), 0.95), probs(CLARITIES.index(clarity), 0.9), size, CFG, COLORS, CLARITIES)
    assert (d.bin, d.color, d.clarity, d.flagged) == (EXPECTED[(color, clarity, big)], color, clarity, False)
    assert d.confidence == pytest.approx(0.9)


def test_cut_size_edge_is_inclusive() -> None:
    assert class_bin("blue", "transparent", 2.0, CFG) == "CUT"
    assert class_bin("blue", "transparent", 1.999, CFG) == "SELECT"


@pytest.mark.parametrize(("conf", "bin_", "flagged"), [
    (0.80, "CUT", False),      # exactly the sort threshold: sorted, not flagged
    (0.7999, "CUT", True),     # just below: sorted and flagged
    (0.50, "CUT", True),       # exactly the flag threshold: still sorted
    (0.4999, "SELECT", True),  # below: SELECT and flagged
])
def test_threshold_edges(conf: float, bin_: str, flagged: bool) -> None:
    # Combined confidence is the min of the two heads' max probabilities.
    d = decide(probs(0, 0.99), probs(0, conf), 3.0, CFG, COLORS, CLARITIES)
    assert (d.bin, d.flagged) == (bin_, flagged)
    d2 = decide(probs(0, conf), probs(0, 0.99), 3.0, CFG, COLORS, CLARITIES)
    assert (d2.bin, d2.flagged) == (bin_, flagged)
    assert d.confidence == pytest.approx(conf)


def test_low_confidence_goes_to_select_even_for_reject_class() -> None:
    d = decide(probs(2, 0.4), probs(2, 0.95), 3.0, CFG, COLORS, CLARITIES)
    assert (d.bin, d.flagged, d.reason) == ("SELECT", True, "low confidence")


def test_thresholds_and_mapping_come_from_config() -> None:
    bins = {c: dict(r) for c, r in DEFAULT_BINS.items()}
    bins["light"]["opaque"] = "REJECT"
    cfg = DecisionConfig(sort_confidence=0.95, flag_confidence=0.6, cut_min_size_mm=3.0, bins=bins)
    d = decide(probs(1, 0.9), probs(2, 0.9), 3.0, cfg, COLORS, CLARITIES)
    assert (d.bin, d.flagged) == ("REJECT", True)
    assert class_bin("blue", "transparent", 2.5, cfg) == "SELECT"


def test_class_order_comes_from_the_model() -> None:
    # A model whose colour head lists inky first.
    order = ("inky", "blue", "light")
    d = decide(probs(1, 0.9), probs(0, 0.9), 3.0, CFG, order, CLARITIES)
    assert (d.color, d.bin) == ("blue", "CUT")


def test_unsortable_objects() -> None:
    assert unsortable_reason(2.0, 3.0, "cluster: touching", CFG).startswith("cluster")
    assert unsortable_reason(0.5, 0.6, "", CFG).startswith("debris")
    assert unsortable_reason(7.0, 8.0, "", CFG).startswith("oversize")
    assert unsortable_reason(2.0, 3.0, "", CFG) == ""
