"""The time planner picks the best step-2 setting that fits, cheaper ones in order, then step 1 only."""

import math

import pytest

from fmc.planner import PREDICTION_MARGIN, candidate_settings, count_patches, plan_step_two
from fmc.tiling import patch_starts

SHAPE = (160, 150, 170)
PATCH = (32, 32, 32)


def test_count_patches_is_the_product_of_per_axis_starts():
    expected = math.prod(len(patch_starts(s, 32, 0.5)) for s in SHAPE)
    assert count_patches(SHAPE, PATCH, 0.5) == expected
    counts = [count_patches(SHAPE, PATCH, o) for o in (0.5, 0.25, 0.125, 0.0)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


def test_candidates_lower_overlap_before_dropping_flips():
    assert candidate_settings(0.5, True) == [
        (0.5, True),
        (0.25, True),
        (0.125, True),
        (0.5, False),
        (0.25, False),
        (0.125, False),
    ]
    assert candidate_settings(0.25, False) == [(0.25, False), (0.125, False)]


def _plan(seconds_left: float, tta: bool = True):
    return plan_step_two(SHAPE, PATCH, 2, 0.5, tta, 0.1, seconds_left, reserve_seconds=1.0)


def test_plenty_of_time_keeps_the_configured_quality():
    plan = _plan(1e6)
    assert (plan.run, plan.overlap, plan.tta) == (True, 0.5, True)


@pytest.mark.parametrize("overlap", [0.25, 0.125])
def test_tighter_budget_lowers_the_overlap_first(overlap):
    batches = math.ceil(count_patches(SHAPE, PATCH, overlap) / 2)
    needed = batches * 0.1 * 4 * PREDICTION_MARGIN + 1.0  # flips cost 4 forwards, plus the reserve
    plan = _plan(needed + 1e-6)
    assert (plan.run, plan.overlap, plan.tta) == (True, overlap, True)
    assert plan.predicted_seconds == pytest.approx(batches * 0.4)


def test_then_flips_are_dropped():
    batches = math.ceil(count_patches(SHAPE, PATCH, 0.5) / 2)
    plan = _plan(batches * 0.1 * PREDICTION_MARGIN + 1.0 + 1e-6)
    assert (plan.run, plan.overlap, plan.tta) == (True, 0.5, False)


def test_a_setting_fits_only_with_its_margin():
    batches = math.ceil(count_patches(SHAPE, PATCH, 0.5) / 2)
    plan = _plan(batches * 0.1 * 4 + 1.0 + 1e-6)  # exactly the prediction: not enough
    assert (plan.overlap, plan.tta) != (0.5, True)


def test_no_time_left_falls_back_to_step_one_only():
    plan = _plan(0.5)
    assert plan.run is False
    assert "step 1 only" in plan.reason
