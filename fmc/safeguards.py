"""What keeps a case alive: read this module top to bottom to learn what happens when things go wrong.

A case on the platform scores nothing when it is killed (10 minutes, start-up included), when a
kernel or a device breaks, or when it runs out of GPU memory. In the order a case meets them:

1. **Kernel and device attempts** (:func:`fallback_attempts`): the requested kernels first, then
   plain fp32 eager on the same device, then the CPU. ``fmc.infer`` re-reads the case and tries
   the next attempt after any unexpected failure; bad input and missing weights are not retried.
2. **The time planner** (:func:`plan_step_two`): before step 2 the pipeline times one real batch
   of patches, and the planner predicts step 2's time for each candidate setting, best quality
   first: the configured overlap with test-time flips, lower overlaps (0.5 -> 0.25 -> 0.125), the
   same without flips, and finally step 1 only. It keeps in reserve what still follows step 2
   (:func:`post_step2_reserve_seconds`). Every decision is logged.
3. **The deadline inside step 2** (``fmc.tiling.Deadline``): should the patches still run late,
   the patches that no longer fit take a stand-in (the step-1 output, or no change) instead of the
   network, so an output is always written in time.
4. **GPU out of memory** (:func:`tile_with_memory_retries`): half the batch, then smaller patches,
   then the output sums on the host (:func:`out_of_memory_fallbacks`).
5. **Non-finite network outputs** (:func:`take_input_where_non_finite_`): float16 overflow gives
   those voxels the input's values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fmc.acceleration import KernelOptions, last_forward_was_float16
from fmc.memory import SLAB_VOXELS
from fmc.tiling import Deadline, PatchSource, TilingConfig, patch_starts, sliding_window_inference

log = logging.getLogger(__name__)

OVERLAP_LADDER = (0.5, 0.25, 0.125)
TTA_FLIPS = 4  # identity + one flip per axis, see FusionPipeline._predictor
DEFAULT_BUDGET_SECONDS = 600.0
SAFETY_MARGIN_SECONDS = 60.0
# A setting fits when its predicted time times this still fits: the patch loop runs slower per
# batch than the one batch the planner times (figures: docs/performance.md). A larger margin would
# trade overlap for fewer stand-ins; what still runs late is caught by the deadline inside step 2
# (fmc.tiling.Deadline).
PREDICTION_MARGIN = 1.15
# What follows step 2 (see post_step2_reserve_seconds), counted in this case's own timed resampling
# in, so the reserve scales with the machine: the native-grid end step (resampling back, the native
# detail's noise pass and in-plane smoothing) and difference weighting, as measured on CPU (figures:
# docs/performance.md).
RESAMPLE_PASSES_AFTER_STEP2 = 11.0
RESAMPLE_PASSES_OF_DW = 3.0
# Chosen, not measured: the host copy and the BigTIFF write of the input's bytes at 200 MB/s, about
# ten times slower than the write measured on the H100 machine (figures: docs/performance.md), so a
# slow disk still fits; plus 2 s for opening the file and the log.
WRITE_BYTES_PER_SECOND = 200e6
WRITE_FIXED_SECONDS = 2.0


@dataclass(frozen=True)
class StepTwoPlan:
    """What step 2 will do, and why."""

    run: bool
    overlap: float
    tta: bool
    predicted_seconds: float
    reason: str


def post_step2_reserve_seconds(resample_in_seconds: float, volume_bytes: int, dw: bool) -> float:
    """Seconds to keep after step 2: resampling back (and DW), the host copy and the write."""
    passes = RESAMPLE_PASSES_AFTER_STEP2 + (RESAMPLE_PASSES_OF_DW if dw else 0.0)
    return passes * resample_in_seconds + volume_bytes / WRITE_BYTES_PER_SECOND + WRITE_FIXED_SECONDS


def count_patches(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> int:
    """Number of sliding-window patches for a (Z, Y, X) volume."""
    return math.prod(len(patch_starts(size, edge, overlap)) for size, edge in zip(shape, patch, strict=True))


def candidate_settings(overlap: float, tta: bool) -> list[tuple[float, bool]]:
    """Settings from best to cheapest: the configured one first, never above the configured quality."""
    overlaps = [overlap] + [o for o in OVERLAP_LADDER if o < overlap]
    flips = [True, False] if tta else [False]
    return [(o, flip) for flip in flips for o in overlaps]


def plan_step_two(
    *,
    shape: tuple[int, int, int],
    patch: tuple[int, int, int],
    batch: int,
    overlap: float,
    tta: bool,
    seconds_per_batch: float,
    seconds_left: float,
    reserve_seconds: float,
) -> StepTwoPlan:
    """Choose overlap / flips so that step 2 plus ``reserve_seconds`` fits in ``seconds_left``.

    ``seconds_per_batch`` is the measured time of one forward pass of ``batch`` patches
    without flips; ``reserve_seconds`` covers what still follows step 2 (DW, resampling
    back, writing).
    """
    available = seconds_left - reserve_seconds
    for candidate_overlap, flip in candidate_settings(overlap, tta):
        batches = math.ceil(count_patches(shape, patch, candidate_overlap) / batch)
        predicted = batches * seconds_per_batch * (TTA_FLIPS if flip else 1)
        if predicted * PREDICTION_MARGIN <= available:
            reason = (
                f"predicted {predicted:.1f}s for step 2 ({predicted * PREDICTION_MARGIN:.1f}s with the "
                f"{PREDICTION_MARGIN - 1:.0%} margin) fits the {available:.1f}s left ({batches} batches x "
                f"{seconds_per_batch:.3f}s{' x 4 flips' if flip else ''})"
            )
            return StepTwoPlan(True, candidate_overlap, flip, predicted, reason)
        log.info(
            "planner: overlap %.3f%s would take %.1fs, %.1fs with the %.0f%% margin > %.1fs available, "
            "trying cheaper",
            candidate_overlap,
            " with flips" if flip else "",
            predicted,
            predicted * PREDICTION_MARGIN,
            100 * (PREDICTION_MARGIN - 1),
            available,
        )
    return StepTwoPlan(
        False, overlap, False, 0.0, f"even the cheapest step 2 exceeds the {available:.1f}s left: step 1 only"
    )


def out_of_memory_fallbacks(
    tiling: TilingConfig, min_patch: int = 32
) -> list[tuple[TilingConfig, str | None]]:
    """The retry ladder for GPU out-of-memory: halve the batch to 1, shrink the patch by a quarter
    (multiples of 16, not below ``min_patch``), then keep the output sums on the host."""
    ladder: list[tuple[TilingConfig, str | None]] = [(tiling, None)]
    current = tiling
    while current.batch > 1:
        current = replace(current, batch=max(1, current.batch // 2))
        ladder.append((current, None))
    while min(current.patch) > min_patch:
        smaller = tuple(max(min_patch, (3 * p // 4) // 16 * 16) for p in current.patch)
        if smaller == current.patch:
            break
        current = replace(current, patch=smaller)
        ladder.append((current, None))
    ladder.append((current, "cpu"))
    return ladder


def tile_with_memory_retries(
    source: PatchSource,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    tiling: TilingConfig,
    deadline: Deadline | None = None,
) -> torch.Tensor:
    """Sliding windows; on GPU out-of-memory retry: half batch, smaller patch, then sums on the host."""
    attempts = out_of_memory_fallbacks(tiling)
    for number, (config, accumulate_on) in enumerate(attempts):
        try:
            out = sliding_window_inference(
                source, predictor, config, accumulate_on=accumulate_on, deadline=deadline
            )
            return out.to(source.device)
        except torch.cuda.OutOfMemoryError:
            if number + 1 == len(attempts):
                raise
            following, host = attempts[number + 1]
            log.warning(
                "GPU out of memory with patch %s batch %d; retrying with patch %s batch %d%s",
                config.patch,
                config.batch,
                following.patch,
                following.batch,
                ", accumulating on the host" if host is not None else "",
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise AssertionError("unreachable: the last attempt re-raises")


def take_input_where_non_finite_(
    prediction: torch.Tensor, image: torch.Tensor, slab_voxels: int = SLAB_VOXELS
) -> int:
    """Give voxels where the networks produced inf / NaN the input's value (in place, z-slab by z-slab).

    Why: a network run in float16 (the CUDA default) overflows above 65504; a case should
    still get a usable output, and the log says what happened. Returns the count replaced.
    """
    rows = max(1, slab_voxels // max(1, prediction[0].numel()))
    replaced = 0
    for z0 in range(0, prediction.shape[0], rows):
        part = prediction[z0 : z0 + rows]
        bad = ~torch.isfinite(part)
        count = int(bad.sum())
        if count:
            part[bad] = image[z0 : z0 + rows][bad]
            replaced += count
    if replaced and last_forward_was_float16():
        log.warning(
            "%d voxels of the network output were not finite (float16 overflow?) and took the input's "
            "values; --precision fp32 avoids that",
            replaced,
        )
    elif replaced:  # float32 does not overflow here: the weights or the input are to blame
        log.warning(
            "%d voxels of the network output were not finite (in float32: not an overflow; check the "
            "weights and the input) and took the input's values",
            replaced,
        )
    return replaced


SAFE_KERNELS = KernelOptions(precision="fp32", channels_last=False, cudnn_benchmark=False, compile=None)


@dataclass(frozen=True)
class Attempt:
    """One way to run a case: the kernels and the device. Later attempts trade speed for safety."""

    kernels: KernelOptions
    device: torch.device

    def describe(self) -> str:
        k = self.kernels
        compiled = f" compile={k.compile}" if k.compile else ""
        return f"{self.device.type} precision={k.precision} channels_last={k.channels_last}{compiled}"


def fallback_attempts(kernels: KernelOptions, device: torch.device) -> list[Attempt]:
    """The requested kernels first, then plain fp32 eager on the same device, then (from CUDA) the CPU.

    The CUDA paths (fp16 weights, compile, cuDNN autotuning) are the fast ones and the least
    proven on a given driver; a case must still get an output if one of them breaks. The CPU
    is last because a sticky CUDA error (e.g. an illegal memory access) poisons the context.
    """
    attempts = [Attempt(kernels, device)]
    if kernels != SAFE_KERNELS:
        attempts.append(Attempt(SAFE_KERNELS, device))
    if device.type != "cpu":
        attempts.append(Attempt(SAFE_KERNELS, torch.device("cpu")))
    return attempts
