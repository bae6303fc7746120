"""fmc.safeguards: the time planner and its reserve, the deadline, the out-of-memory ladder, the kernel/device
attempts."""

import logging
import math
import time

import pytest
import torch

from fmc import safeguards
from fmc.acceleration import KernelOptions
from fmc.safeguards import (
    PREDICTION_MARGIN,
    SAFE_KERNELS,
    Attempt,
    Deadline,
    candidate_settings,
    count_patches,
    fallback_attempts,
    out_of_memory_fallbacks,
    plan_step_two,
    post_step2_reserve_seconds,
    tile_with_memory_retries,
)
from fmc.tiling import TensorSource, TilingConfig, patch_starts, sliding_window_inference

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


# ---------------------------------------------------------------- the deadline inside step 2

TILE = (16, 16, 16)


def random_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class FakeClock:
    """Stands in for ``time.perf_counter`` in the deadline's stopwatch; ``advance`` moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_patches_that_would_end_past_the_deadline_take_the_fallback(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(safeguards, "_clock", clock)
    calls = []

    def slow_sevens(batch: torch.Tensor) -> torch.Tensor:  # every network batch "takes" 1 s
        calls.append(batch.shape[0])
        clock.advance(1.0)
        return torch.full_like(batch, 7.0)

    volume = random_volume((1, 16, 16, 64))  # 7 patches along x at overlap 0.5, 4 batches of 2
    deadline = Deadline(stop_at=clock.now + 3.5, fallback=lambda b: torch.full_like(b, 3.0))
    config = TilingConfig(patch=TILE, overlap=0.5, batch=2)
    with caplog.at_level(logging.WARNING):
        out = tile_with_memory_retries(TensorSource(volume), slow_sevens, config, deadline)
    # batches end at 101, 102, 103; a 4th would end at 104 > 103.5, so its patches take the fallback
    assert calls == [2, 2, 2]
    assert clock.now <= deadline.stop_at
    assert "time is up after 6 of 7 patches: the 1 left take the fallback" in caplog.text
    assert (deadline.stand_ins, deadline.patches) == (1, 7)
    starts = patch_starts(64, 16, 0.5)
    network_only, fallback_only = slice(0, starts[-2]), slice(starts[-1] + 8, 64)  # past the 6th's reach
    assert torch.allclose(out[..., network_only], torch.tensor(7.0))
    assert torch.allclose(out[..., fallback_only], torch.tensor(3.0))
    assert out.min() >= 3.0 - 1e-5 and out.max() <= 7.0 + 1e-5


def test_the_cost_of_the_fallback_patches_is_reserved_too(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(safeguards, "_clock", clock)
    calls = []

    class SlowSource(TensorSource):  # gathering a patch "takes" 0.5 s, for a stand-in too
        def patch(self, start, size):
            clock.advance(0.5)
            return super().patch(start, size)

    def network(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        clock.advance(1.0)
        return batch

    deadline = Deadline(stop_at=clock.now + 5.0, fallback=lambda b: b)
    volume = random_volume((1, 16, 16, 64))
    out = tile_with_memory_retries(
        SlowSource(volume), network, TilingConfig(patch=TILE, overlap=0.5, batch=2), deadline
    )
    # A batch costs 2 s (gathering included), a stand-in 0.5 s. At 102, a second batch would end
    # at 104 and its 3 stand-ins at 105.5 > 105: so the 5 patches left are stand-ins, ending at 104.5.
    # Counting the network alone would run it and end at 105.5, past the deadline.
    assert calls == [2]
    assert clock.now == pytest.approx(104.5)
    torch.testing.assert_close(out, volume, atol=1e-5, rtol=0)  # the identity fallback: same result


def test_a_deadline_far_away_changes_nothing():
    volume = random_volume((1, 37, 50, 29))
    config = TilingConfig(patch=TILE, overlap=0.5, batch=2)

    def network(batch: torch.Tensor) -> torch.Tensor:
        return batch * 2 + 1

    without = sliding_window_inference(volume, network, config)
    far = Deadline(stop_at=time.perf_counter() + 3600, fallback=lambda b: torch.zeros_like(b))
    assert torch.equal(tile_with_memory_retries(TensorSource(volume), network, config, far), without)
    assert (far.stand_ins, far.patches) == (0, count_patches(volume.shape[1:], TILE, 0.5))


@pytest.mark.cuda  # the CUDA queue is bounded by events; skipped without CUDA (conftest)
def test_a_deadline_far_away_changes_nothing_on_cuda():
    volume = random_volume((2, 37, 50, 29)).cuda()
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 1, 3, padding=1).cuda()
    config = TilingConfig(patch=TILE, overlap=0.5)
    without = sliding_window_inference(volume, conv, config)
    far = Deadline(stop_at=time.perf_counter() + 3600, fallback=lambda b: torch.zeros_like(b[:, :1]))
    assert torch.equal(tile_with_memory_retries(TensorSource(volume), conv, config, far), without)


# ---------------------------------------------------------------- step 2's runner


def _patches(volume: torch.Tensor, calls: list[int], warm_up: bool = False) -> safeguards.StepTwoPatches:
    """Step 2 on ``volume`` with a network that adds 1 (with flips: the same), a stand-in of -1."""

    def network(tta: bool):
        def forward(batch: torch.Tensor) -> torch.Tensor:
            calls.append(batch.shape[0])
            return batch[:, :1] + 1.0

        return forward

    return safeguards.StepTwoPatches(
        TensorSource(volume),
        network=network,
        blended=lambda forward: forward,
        stand_in=lambda batch: torch.full_like(batch[:, :1], -1.0),
        warm_up=warm_up,
    )


def test_without_a_budget_step_two_runs_as_configured_and_records_no_plan():
    volume, calls = random_volume((1, 20, 20, 20)), []
    record = safeguards.StepTwoRecord()
    config = TilingConfig(patch=TILE, overlap=0.5, batch=2)
    out = safeguards.run_step_two(_patches(volume, calls), config, False, None, record)
    torch.testing.assert_close(out, volume[0] + 1.0, atol=1e-5, rtol=0)
    assert (record.plan, record.stand_ins, record.decisions) == (None, None, [])
    assert len(calls) == math.ceil(count_patches(volume.shape[1:], TILE, 0.5) / 2)  # no timed batch


def test_with_time_the_planner_times_one_batch_and_the_deadline_counts_no_stand_ins():
    volume, calls = random_volume((1, 20, 20, 20)), []
    record = safeguards.StepTwoRecord()
    budget = safeguards.Budget(time.perf_counter() + 3600, reserve_seconds=10.0)
    config = TilingConfig(patch=TILE, overlap=0.5, batch=2)
    out = safeguards.run_step_two(_patches(volume, calls, warm_up=True), config, False, budget, record)
    torch.testing.assert_close(out, volume[0] + 1.0, atol=1e-5, rtol=0)
    assert record.plan is not None and record.plan.run and record.plan.overlap == 0.5
    assert record.stand_ins == 0 and len(record.decisions) == 1 and "fits" in record.decisions[0]
    assert calls[:2] == [2, 2]  # the warm-up and the timed batch, then the loop
    assert len(calls) == 2 + math.ceil(count_patches(volume.shape[1:], TILE, 0.5) / 2)


def test_no_time_left_skips_step_two_and_says_so():
    volume, calls = random_volume((1, 20, 20, 20)), []
    record = safeguards.StepTwoRecord()
    budget = safeguards.Budget(time.perf_counter(), reserve_seconds=10.0)
    out = safeguards.run_step_two(_patches(volume, calls), TilingConfig(patch=TILE), False, budget, record)
    assert out is None and record.plan is not None and not record.plan.run
    assert "step 1 only" in record.decisions[0] and record.stand_ins is None
    assert calls == [2]  # only the timed batch
