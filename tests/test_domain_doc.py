"""docs/domain.md restates the domain's rules; its marked tables must say what the code does."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from sorterd import domain
from sorterd.calibration import checklist
from sorterd.config import CalibrationConfig, DecisionConfig
from sorterd.train.evaluate import MILESTONES

DOC = Path(__file__).resolve().parent.parent / "docs" / "domain.md"


def table(name: str) -> list[list[str]]:
    """The rows (header first, without the |---| line) of the table after `<!-- table: name -->`."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- table: {name} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(re.fullmatch(r"-+", c) for c in cells):
            rows.append(cells)
    assert rows, f"docs/domain.md: table {name!r} is empty"
    return rows


def test_the_mapping_table_is_the_default_bins() -> None:
    head, *rows = table("mapping")
    assert head[1:] == list(domain.CLARITIES)
    assert {r[0]: dict(zip(head[1:], r[1:], strict=True)) for r in rows} == domain.DEFAULT_BINS
    assert [r[0] for r in rows] == list(domain.COLORS)


def test_the_cost_table_is_the_cost_matrix() -> None:
    head, *rows = table("cost")
    assert head[1:] == list(domain.BINS) and [r[0] for r in rows] == list(domain.BINS)
    assert [[int(c) for c in r[1:]] for r in rows] == domain.COST.tolist()


def test_the_flags_table_lists_the_annotation_flags() -> None:
    _, *rows = table("flags")
    assert [r[0].strip("`") for r in rows] == list(domain.FLAGS)


def test_the_threshold_table_gives_the_decision_defaults() -> None:
    _, *rows = table("thresholds")
    defaults = {f.name: f.default for f in fields(DecisionConfig)}
    for row in rows:
        name, value = re.fullmatch(r"`decision\.(\w+)` \((.+)\)", row[2]).groups()  # type: ignore[union-attr]
        assert str(defaults[name]) == value or float(defaults[name]) == float(value), row
    gates = [float(x) for r in rows for x in re.findall(r"\d\.\d\d", r[0])]
    assert gates == [DecisionConfig.sort_confidence, DecisionConfig.flag_confidence,
                     DecisionConfig.sort_confidence, DecisionConfig.flag_confidence]


def test_the_calibration_table_gives_the_checklist_limits() -> None:
    limits = {r[0]: r[2] for r in table("calibration")[1:]}
    assert f"{checklist.BACKLIGHT_DRIFT_MAX:.0%}".replace("%", " %") in limits["backlight"]
    assert f"ΔE > {checklist.DELTA_E_WARN}" in limits["white balance"]
    assert f"{checklist.SCALE_ERROR_MAX:.0%}".replace("%", " %") in limits["scale"]
    assert f"{checklist.AGREEMENT_MIN:.0%}".replace("%", " %") in limits["reference stones"]
    assert f"({CalibrationConfig.warmup_s:.0f} s)" in limits["warm-up"]


@pytest.mark.parametrize("phase", list(MILESTONES))
def test_the_milestone_table_is_the_evaluation_milestones(phase: str) -> None:
    rows = {r[0]: tuple(float(c) for c in r[1:]) for r in table("milestones")[1:]}
    assert rows.keys() == MILESTONES.keys()
    assert rows[phase] == MILESTONES[phase]
