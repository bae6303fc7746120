"""fmc.safeguards: the time planner and its reserve, the out-of-memory ladder, the kernel/device attempts."""

import math

import pytest
import torch

from fmc.acceleration import KernelOptions
from fmc.safeguards import (
    PREDICTION_MARGIN,
    SAFE_KERNELS,
    Attempt,
    candidate_settings,
    count_patches,
    fallback_attempts,
    out_of_memory_fallbacks,
    plan_step_two,
    post_step2_reserve_seconds,
)
from fmc.tiling import TilingConfig, patch_starts

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
    return plan_step_two(
        shape=SHAPE,
        patch=PATCH,
        batch=2,
        overlap=0.5,
        tta=tta,
        seconds_per_batch=0.1,
        seconds_left=seconds_left,
        reserve_seconds=1.0,
    )


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


def test_the_reserve_counts_resampling_passes_the_write_and_a_fixed_part():
    # 11 passes of 1.5 s (the native-grid end step), 400 MB at 200 MB/s, 2 s fixed; DW adds 3 passes
    assert post_step2_reserve_seconds(1.5, 400_000_000, dw=False) == pytest.approx(16.5 + 2.0 + 2.0)
    assert post_step2_reserve_seconds(1.5, 400_000_000, dw=True) == pytest.approx(21.0 + 2.0 + 2.0)


def test_out_of_memory_ladder_halves_batch_then_shrinks_patch_then_uses_the_host():
    ladder = out_of_memory_fallbacks(TilingConfig(patch=(128, 128, 128), batch=4))
    steps = [(config.batch, config.patch[0], host) for config, host in ladder]
    assert steps == [
        (4, 128, None),
        (2, 128, None),
        (1, 128, None),
        (1, 96, None),
        (1, 64, None),
        (1, 48, None),
        (1, 32, None),
        (1, 32, "cpu"),
    ]


def test_fallbacks_go_from_the_requested_kernels_to_fp32_eager_then_to_the_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fast = KernelOptions(precision="fp16-weights", compile="default")
    assert fallback_attempts(fast, cuda) == [
        Attempt(fast, cuda),
        Attempt(SAFE_KERNELS, cuda),
        Attempt(SAFE_KERNELS, cpu),
    ]
    assert fallback_attempts(SAFE_KERNELS, cuda) == [Attempt(SAFE_KERNELS, cuda), Attempt(SAFE_KERNELS, cpu)]
    assert fallback_attempts(KernelOptions(), cpu) == [
        Attempt(KernelOptions(), cpu),
        Attempt(SAFE_KERNELS, cpu),
    ]
    assert fallback_attempts(SAFE_KERNELS, cpu) == [Attempt(SAFE_KERNELS, cpu)]
