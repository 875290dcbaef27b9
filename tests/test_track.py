"""Tracking: a stone seen again where it was predicted to be is known; another is not."""

from __future__ import annotations

import numpy as np
import pytest

from sorterd.sorting.segment import Seen
from sorterd.sorting.track import Track, Tracker, is_known

TOL_MM = 1.5
MS = 1_000_000
STILL = 50.0  # mm/s: slower than this an object is at rest (geometry.speed_min_mm_s)


def moving(x_mm: float, y_mm: float) -> Seen:
    """An object whose own pair measured it moving at the channel's speed."""
    return Seen(x_mm, y_mm, 400.0, 3.0)


def resting(x_mm: float, y_mm: float, area_mm2: float = 3.0, speed: float | None = 0.0) -> Seen:
    return Seen(x_mm, y_mm, speed, area_mm2)


def tracker_with(*tracks: tuple[Track, float]) -> Tracker:
    t = Tracker(TOL_MM)
    for track, y in tracks:
        t.add(track, y)
    return t


STONE = Track("S000001", t_obs_ns=1_000 * MS, x_mm=12.0, speed_mm_s=400.0, length_mm=2.0)


def test_a_stone_seen_again_at_its_predicted_place_is_known() -> None:
    known = tracker_with((STONE, 5.0)).snapshot()
    # 10 ms later at 400 mm/s it has moved 4 mm.
    assert is_known(moving(16.0, 5.0), 1_010 * MS, known, TOL_MM, STILL)
    assert is_known(moving(16.0 + 1.4, 5.0 + 0.9), 1_010 * MS, known, TOL_MM, STILL)  # within both tolerances


def test_an_object_elsewhere_along_the_channel_is_new() -> None:
    known = tracker_with((STONE, 5.0)).snapshot()
    assert not is_known(moving(12.0, 5.0), 1_010 * MS, known, TOL_MM, STILL)  # where it was, not where it is now
    assert not is_known(moving(16.0 + 1.5, 5.0), 1_010 * MS, known, TOL_MM, STILL)  # the x tolerance is strict
    assert not is_known(moving(16.0 - 1.6, 5.0), 1_010 * MS, known, TOL_MM, STILL)


@pytest.mark.parametrize(("dy", "known_again"), [(0.0, True), (0.99, True), (-0.99, True), (1.0, False), (-1.2, False)])
def test_the_y_tolerance_is_one_millimetre_across_the_channel(dy: float, known_again: bool) -> None:
    """A stone beside the known one at the same x is a different stone (the channel is a few mm wide)."""
    known = tracker_with((STONE, 5.0)).snapshot()
    assert is_known(moving(16.0, 5.0 + dy), 1_010 * MS, known, TOL_MM, STILL) is known_again


def test_each_known_stone_is_predicted_from_its_own_observation() -> None:
    slow = Track("S000002", t_obs_ns=1_000 * MS, x_mm=5.0, speed_mm_s=100.0, length_mm=2.0)
    known = tracker_with((STONE, 5.0), (slow, 2.0)).snapshot()
    assert is_known(moving(6.0, 2.0), 1_010 * MS, known, TOL_MM, STILL)  # the slow one moved 1 mm
    assert not is_known(moving(6.0, 5.0), 1_010 * MS, known, TOL_MM, STILL)  # at the slow one's x, the fast one's y
    assert not is_known(moving(16.0, 2.0), 1_010 * MS, known, TOL_MM, STILL)  # at the fast one's x, the slow one's y


def test_the_snapshot_is_immutable_and_the_tracker_forgets_the_oldest() -> None:
    t = tracker_with((STONE, 5.0))
    snap = t.snapshot()
    for i in range(64):
        t.add(Track(f"S{i + 10:06d}", 2_000 * MS, 30.0, 400.0, 2.0), 9.0)
    assert snap == ((STONE, 5.0),)  # what a worker holds does not change under it
    later = t.snapshot()
    assert len(later) == 64 and STONE not in {tr for tr, _ in later}
    assert not is_known(moving(16.0, 5.0), 1_010 * MS, later, TOL_MM, STILL)


STOPPER = Track("S000003", t_obs_ns=1_000 * MS, x_mm=12.0, speed_mm_s=400.0, length_mm=2.0, area_mm2=3.0)


@pytest.mark.parametrize("x_mm", [12.0, 13.0, 15.9, 16.0])
def test_a_decided_stone_that_stopped_in_view_is_known_wherever_it_stopped(x_mm: float) -> None:
    """Decided at 12 mm moving; 10 ms later found at rest anywhere up to where it would be."""
    known = tracker_with((STOPPER, 5.0)).snapshot()
    assert is_known(resting(x_mm, 5.0), 1_010 * MS, known, TOL_MM, STILL)
    assert is_known(resting(x_mm, 5.0, speed=None), 1_010 * MS, known, TOL_MM, STILL)  # no speed measured


def test_a_moving_object_where_a_decided_stone_was_is_a_new_stone() -> None:
    """The stone following a decided one passes where that one was: it is new, not the old one stopped."""
    known = tracker_with((STOPPER, 5.0)).snapshot()
    assert not is_known(moving(13.0, 5.0), 1_010 * MS, known, TOL_MM, STILL)


@pytest.mark.parametrize(("seen", "why"), [
    (resting(9.0, 5.0), "behind where it was seen: stones do not go backwards"),
    (resting(19.0, 5.0), "beyond where it could have got"),
    (resting(14.0, 6.5), "beside it across the channel"),
    (resting(14.0, 5.0, area_mm2=6.0), "twice its area: another stone"),
])
def test_a_resting_object_that_cannot_be_the_decided_stone_is_new(seen: Seen, why: str) -> None:
    known = tracker_with((STOPPER, 5.0)).snapshot()
    assert not is_known(seen, 1_010 * MS, known, TOL_MM, STILL), why


def test_a_still_stone_decided_at_rest_is_known_in_every_later_capture() -> None:
    still = Track("S000004", t_obs_ns=1_000 * MS, x_mm=20.0, speed_mm_s=0.0, length_mm=2.0, area_mm2=3.0)
    known = tracker_with((still, 5.0)).snapshot()
    for later_ms in (1_100, 2_000, 60_000):
        assert is_known(resting(20.1, 5.0), later_ms * MS, known, TOL_MM, STILL)


def test_another_stone_put_down_where_a_still_one_was_is_new() -> None:
    """Tweezers, one stone at a time on one spot: same place and area, another look."""
    a, b = np.zeros(9, np.float32), np.zeros(9, np.float32)
    a[0], b[1] = 1.0, 1.0  # unit-norm looks, uncorrelated
    still = Track("S000005", t_obs_ns=1_000 * MS, x_mm=20.0, speed_mm_s=0.0, length_mm=2.0, area_mm2=3.0, look=a)
    known = tracker_with((still, 5.0)).snapshot()
    assert not is_known(Seen(20.0, 5.0, 0.0, 3.0, b), 3_000 * MS, known, TOL_MM, STILL)
    assert is_known(Seen(20.0, 5.0, 0.0, 3.0, a.copy()), 3_000 * MS, known, TOL_MM, STILL)
