"""What keeps a case alive: read this module top to bottom to learn what happens when things go wrong.

A case on the platform scores nothing when it is killed (10 minutes, start-up included), when a
kernel or a device breaks, or when it runs out of GPU memory. In the order a case meets them:

1. **Kernel and device attempts** (:func:`fallback_attempts`): the requested kernels first, then
   plain fp32 eager on the same device, then the CPU. ``fmc.infer`` re-reads the case and tries
   the next attempt after any unexpected failure; bad input and missing weights are not retried.
Step 2 meets 2-4 in :func:`run_step_two`, which wraps the pure patch loop
(:func:`fmc.tiling.sliding_window_inference`) as MONAI's ``SlidingWindowInfererAdapt`` wraps its.

2. **The time planner** (:func:`plan_step_two`): before step 2 :func:`time_one_batch` times one
   real batch of patches, and the planner predicts step 2's time for each candidate setting, best quality
   first: the configured overlap with test-time flips, lower overlaps (0.5 -> 0.25 -> 0.125), the
   same without flips, and finally step 1 only. It keeps in reserve what still follows step 2
   (:func:`post_step2_reserve_seconds`). Every decision is logged.
3. **The deadline inside step 2** (:class:`Deadline`): should the patches still run late,
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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from fmc.acceleration import KernelOptions, last_forward_was_float16
from fmc.memory import SLAB_VOXELS
from fmc.tiling import (
    BatchChooser,
    PatchSource,
    Predictor,
    TilingConfig,
    patch_starts,
    sliding_window_inference,
)

log = logging.getLogger(__name__)

OVERLAP_LADDER = (0.5, 0.25, 0.125)
TTA_FLIPS = 4  # identity + one flip per axis, see fmc.pipeline.with_flips
DEFAULT_BUDGET_SECONDS = 600.0
SAFETY_MARGIN_SECONDS = 60.0
# A setting fits when its predicted time times this still fits: the patch loop runs slower per
# batch than the one batch the planner times (figures: docs/performance.md). A larger margin would
# trade overlap for fewer stand-ins; what still runs late is caught by the deadline inside step 2
# (Deadline).
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
# With a deadline, at most this many network batches wait in the CUDA queue, so the clock
# measures finished work (the GPU still always has the next batch queued).
QUEUED_BATCHES = 2
_clock = time.perf_counter  # the deadline's clock; the tests substitute a fake one


@dataclass(frozen=True)
class StepTwoPlan:
    """What step 2 will do, and why."""

    run: bool
    overlap: float
    tta: bool
    predicted_seconds: float
    reason: str


@dataclass(frozen=True)
class Budget:
    """When the case must be written by, and the seconds that still follow step 2 until then."""

    deadline: float  # a time.perf_counter() value
    reserve_seconds: float  # see post_step2_reserve_seconds

    @property
    def step_two_ends(self) -> float:
        """When step 2's patch loop must end."""
        return self.deadline - self.reserve_seconds


@dataclass(frozen=True)
class StepTwoPatches:
    """Step 2 as its safeguards see it: where the patches come from, what predicts them, and what a
    patch that no longer fits gets instead."""

    source: PatchSource
    network: Callable[[bool], Predictor]  # the step-2 forward, with test-time flips (True) or without
    blended: Callable[[Predictor], Predictor]  # what the patches are blended as, given that forward
    stand_in: Predictor  # a late patch's share of the blend (fmc.step1_mode)
    warm_up: bool = False  # time the planner's batch after a first one (torch.compile: first-use costs)


@dataclass
class StepTwoRecord:
    """What the safeguards did to step 2, for the log and the run report."""

    decisions: list[str] = field(default_factory=list)  # the planner's choice and the stand-ins, in words
    plan: StepTwoPlan | None = None  # None: no budget
    stand_ins: int | None = None  # patches the deadline gave the stand-in; None: no budget


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


def time_one_batch(patches: StepTwoPatches, tiling: TilingConfig) -> float:
    """Seconds to gather a full batch of patches (the volume's corner, its step-1 channel
    upsampled as for every patch) and run one step-2 forward on it, without flips.

    Why a step-2 batch and not step 1's forward, which would be free: step 1's first call
    pays for first-use costs (on CPU its 224^3 forward ran at 1.36 M voxels/s, warm 1.82,
    a 2x128^3 step-2 batch 2.41 even on its first call; on CUDA kernel loading and cuDNN's
    algorithm choice), so the estimate was about 1.8x pessimistic and the planner lowered
    the overlap or skipped step 2 for nothing. One batch is a small part of step 2, and if
    the estimate turns out optimistic, the deadline inside step 2 still holds.
    """
    source = patches.source
    patch = tuple(min(edge, size) for edge, size in zip(tiling.patch, source.shape, strict=True))
    forward = patches.network(False)
    cuda = source.device.type == "cuda"

    def one_batch() -> None:
        forward(torch.stack([source.patch((0, 0, 0), patch) for _ in range(tiling.batch)]))
        if cuda:
            torch.cuda.synchronize(source.device)

    if cuda or patches.warm_up:
        one_batch()  # warm-up: allocator, cuDNN algorithm choice, compilation
    start = time.perf_counter()
    one_batch()
    return time.perf_counter() - start


def plan_for(patches: StepTwoPatches, tiling: TilingConfig, tta: bool, budget: Budget) -> StepTwoPlan:
    """Time one real batch of ``patches``, then let the planner pick overlap and flips."""
    seconds_per_batch = time_one_batch(patches, tiling)
    return plan_step_two(
        shape=patches.source.shape,
        patch=tiling.patch,
        batch=tiling.batch,
        overlap=tiling.overlap,
        tta=tta,
        seconds_per_batch=seconds_per_batch,
        seconds_left=budget.deadline - time.perf_counter(),
        reserve_seconds=budget.reserve_seconds,
    )


@dataclass
class Deadline:
    """Stop running the network so that the patch loop ends by ``stop_at`` (a ``time.perf_counter()``
    value); the patches left then take ``fallback(batch)``, a cheap stand-in prediction.

    Why: the planner predicts step 2's time from one batch, and a machine can turn out slower
    than that batch said. Patches that no longer fit get the stand-in (step 2: the step-1
    output, or no change) instead of the case missing the platform's time limit.
    """

    stop_at: float
    fallback: Predictor
    # filled in during the patch loop, for the run report: how many patches took the stand-in, of how many
    stand_ins: int = 0
    patches: int = 0

    def chooser(self, device: torch.device) -> BatchChooser:
        """The patch loop's hook (:data:`fmc.tiling.BatchChooser`) for one pass over the patches;
        an out-of-memory retry is a new pass, so the counts and the stopwatch start again."""
        self.stand_ins = self.patches = 0
        return _Stopwatch(self, device).choose


class _Stopwatch:
    """Decides before each network batch whether it, the batches still queued on the GPU and the
    stand-ins for the remaining patches still fit before the deadline."""

    def __init__(self, deadline: Deadline, device: torch.device) -> None:
        self.deadline, self.device = deadline, device
        self.queued: deque[torch.cuda.Event] = deque()
        self.started: float | None = None
        self.batches = 0
        self.fetch_seconds = 0.0
        self.fetched = 0
        self.stopped = False

    def choose(self, network: Predictor, done: int, count: int, total: int) -> Predictor:
        """``network`` for a batch that still fits, else the deadline's fallback (logged once)."""
        self.deadline.patches = total
        if self.network_fits(total - done - count):
            return self._timed(network, count)
        if self.deadline.stand_ins == 0:
            log.warning(
                "time is up after %d of %d patches: the %d left take the fallback prediction",
                done,
                total,
                total - done,
            )
        self.deadline.stand_ins += count
        return self.deadline.fallback

    def _timed(self, network: Predictor, count: int) -> Predictor:
        """``network``, counting its batch of ``count`` patches and the seconds from now to its call:
        the loop gathers the patches in between, which a stand-in patch costs too."""
        chosen_at = _clock()

        def run(batch: torch.Tensor) -> torch.Tensor:
            fetch_seconds = _clock() - chosen_at  # on CUDA: queued, not finished, work
            prediction = network(batch)
            self.ran_batch(count, fetch_seconds)
            return prediction

        return run

    def network_fits(self, patches_after: int) -> bool:
        """Whether one more network batch fits, with ``patches_after`` patches still to follow it."""
        if self.stopped:
            return False
        now = _clock()
        if self.started is None:  # nothing measured yet: the first batch always runs
            self.started = now
            return True
        per_batch = (now - self.started) / max(self.batches - len(self.queued), 1)
        per_patch = self.fetch_seconds / max(self.fetched, 1)
        finish = now + (len(self.queued) + 1) * per_batch + patches_after * per_patch
        self.stopped = finish > self.deadline.stop_at
        return not self.stopped

    def ran_batch(self, patches: int, fetch_seconds: float) -> None:
        """Count a network batch of ``patches`` that took ``fetch_seconds`` to gather (the cost of a
        stand-in patch too); on CUDA, wait until at most QUEUED_BATCHES are still unfinished."""
        self.batches += 1
        self.fetched += patches
        self.fetch_seconds += fetch_seconds
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        self.queued.append(event)
        while len(self.queued) > QUEUED_BATCHES:
            self.queued.popleft().synchronize()


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
    predictor: Predictor,
    tiling: TilingConfig,
    deadline: Deadline | None = None,
) -> torch.Tensor:
    """Sliding windows; on GPU out-of-memory retry: half batch, smaller patch, then sums on the host.
    ``deadline``: the patches that would end the loop after ``deadline.stop_at`` take its fallback."""
    attempts = out_of_memory_fallbacks(tiling)
    for number, (config, accumulate_on) in enumerate(attempts):
        try:
            choose = None if deadline is None else deadline.chooser(source.device)
            out = sliding_window_inference(
                source, predictor, config, accumulate_on=accumulate_on, choose=choose
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


def run_step_two(
    patches: StepTwoPatches, tiling: TilingConfig, tta: bool, budget: Budget | None, record: StepTwoRecord
) -> torch.Tensor | None:
    """Step 2 under its safeguards, as a case meets them: the planner picks overlap and flips (or
    skips step 2: None, the step-1 output stands in), the out-of-memory ladder retries, and the
    deadline gives the patches that no longer fit their stand-in. Without a budget only the ladder
    acts. Returns the blended (Z, Y, X) volume; ``record`` gets what was decided.
    """
    deadline = None
    if budget is not None:
        plan = plan_for(patches, tiling, tta, budget)
        log.info("planner: %s", plan.reason)
        record.decisions.append(plan.reason)
        record.plan = plan
        if not plan.run:
            return None
        tiling, tta = replace(tiling, overlap=plan.overlap), plan.tta
        deadline = Deadline(budget.step_two_ends, patches.stand_in)
    out = tile_with_memory_retries(patches.source, patches.blended(patches.network(tta)), tiling, deadline)
    if deadline is not None:
        _note_stand_ins(record, deadline)
    return out[0]


def _note_stand_ins(record: StepTwoRecord, deadline: Deadline) -> None:
    """The deadline's stand-ins into ``record``: as data, and in words when there were any."""
    record.stand_ins = deadline.stand_ins
    if deadline.stand_ins:
        record.decisions.append(
            f"time is up after {deadline.patches - deadline.stand_ins} of {deadline.patches} patches: "
            f"the {deadline.stand_ins} left took the fallback prediction"
        )


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
