"""Time planner: pick the step-2 settings that finish inside the platform's budget.

The platform kills a case after 10 minutes, container start and model load included, and
a killed case scores nothing. So before step 2 the pipeline times a real patch batch, and
this module predicts the step-2 time for each candidate setting, best quality first:
the configured overlap with test-time flips, lower overlaps (0.5 -> 0.25 -> 0.125), the
same without flips, and finally step 1 only. The first candidate that fits is taken and
every decision is logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fmc.tiling import patch_starts

log = logging.getLogger(__name__)

OVERLAP_LADDER = (0.5, 0.25, 0.125)
TTA_FLIPS = 4  # identity + one flip per axis, see FusionPipeline._predictor
DEFAULT_BUDGET_SECONDS = 600.0
SAFETY_MARGIN_SECONDS = 60.0
# A setting fits when its predicted time times this still fits: on CPU (study 4, three runs) the
# patch loop ran 14-25% slower per batch than the timed batch. A larger margin would trade
# overlap for fewer stand-ins; what still runs late is caught by the deadline inside step 2
# (fmc.tiling.Deadline).
PREDICTION_MARGIN = 1.15


@dataclass(frozen=True)
class StepTwoPlan:
    """What step 2 will do, and why."""

    run: bool
    overlap: float
    tta: bool
    predicted_seconds: float
    reason: str


def count_patches(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> int:
    """Number of sliding-window patches for a (Z, Y, X) volume."""
    return math.prod(len(patch_starts(size, edge, overlap)) for size, edge in zip(shape, patch, strict=True))


def candidate_settings(overlap: float, tta: bool) -> list[tuple[float, bool]]:
    """Settings from best to cheapest: the configured one first, never above the configured quality."""
    overlaps = [overlap] + [o for o in OVERLAP_LADDER if o < overlap]
    flips = [True, False] if tta else [False]
    return [(o, flip) for flip in flips for o in overlaps]


def plan_step_two(
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
