"""Tracking: a stone seen again where it was predicted to be is known; another is not."""

from __future__ import annotations

import pytest

from sorterd.sorting.track import Track, Tracker, is_known

TOL_MM = 1.5
MS = 1_000_000


def tracker_with(*tracks: tuple[Track, float]) -> Tracker:
    t = Tracker(TOL_MM)
    for track, y in tracks:
        t.add(track, y)
    return t


STONE = Track("S000001", t_obs_ns=1_000 * MS, x_mm=12.0, speed_mm_s=400.0, length_mm=2.0)


def test_a_stone_seen_again_at_its_predicted_place_is_known() -> None:
    known = tracker_with((STONE, 5.0)).snapshot()
    # 10 ms later at 400 mm/s it has moved 4 mm.
    assert is_known(16.0, 5.0, 1_010 * MS, known, TOL_MM)
    assert is_known(16.0 + 1.4, 5.0 + 0.9, 1_010 * MS, known, TOL_MM)  # within both tolerances


def test_an_object_elsewhere_along_the_channel_is_new() -> None:
    known = tracker_with((STONE, 5.0)).snapshot()
    assert not is_known(12.0, 5.0, 1_010 * MS, known, TOL_MM)  # where it was, not where it is now
    assert not is_known(16.0 + 1.5, 5.0, 1_010 * MS, known, TOL_MM)  # the x tolerance is strict
    assert not is_known(16.0 - 1.6, 5.0, 1_010 * MS, known, TOL_MM)


@pytest.mark.parametrize(("dy", "known_again"), [(0.0, True), (0.99, True), (-0.99, True), (1.0, False), (-1.2, False)])
def test_the_y_tolerance_is_one_millimetre_across_the_channel(dy: float, known_again: bool) -> None:
    """A stone beside the known one at the same x is a different stone (the channel is a few mm wide)."""
    known = tracker_with((STONE, 5.0)).snapshot()
    assert is_known(16.0, 5.0 + dy, 1_010 * MS, known, TOL_MM) is known_again


def test_each_known_stone_is_predicted_from_its_own_observation() -> None:
    slow = Track("S000002", t_obs_ns=1_000 * MS, x_mm=5.0, speed_mm_s=100.0, length_mm=2.0)
    known = tracker_with((STONE, 5.0), (slow, 2.0)).snapshot()
    assert is_known(6.0, 2.0, 1_010 * MS, known, TOL_MM)  # the slow one moved 1 mm
    assert not is_known(6.0, 5.0, 1_010 * MS, known, TOL_MM)  # at the slow one's x, the fast one's y
    assert not is_known(16.0, 2.0, 1_010 * MS, known, TOL_MM)  # at the fast one's x, the slow one's y


def test_the_snapshot_is_immutable_and_the_tracker_forgets_the_oldest() -> None:
    t = tracker_with((STONE, 5.0))
    snap = t.snapshot()
    for i in range(64):
        t.add(Track(f"S{i + 10:06d}", 2_000 * MS, 30.0, 400.0, 2.0), 9.0)
    assert snap == ((STONE, 5.0),)  # what a worker holds does not change under it
    later = t.snapshot()
    assert len(later) == 64 and STONE not in {tr for tr, _ in later}
    assert not is_known(16.0, 5.0, 1_010 * MS, later, TOL_MM)
