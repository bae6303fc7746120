"""How a network's output becomes the change the method makes, and how that change is applied.

The model card's ``step1_mode`` (:data:`fmc.method.STEP1_MODES`) decides it for both steps.
"output" (the paper): a network's output is the prediction. "correction": a network predicts a
change of what it started from (step 1: its global cube; step 2: its residual channel), and the
change, brought to the 0.6 um grid, is added back onto the input. Networks with zero heads then
change nothing, and an untrained pipeline returns its input to the last bit.

Why one object: training (:mod:`fmc.training.module`, joint training's step-1 guide) and inference
(:mod:`fmc.pipeline`) must do the same arithmetic, or step 2 trains on another channel than the one
it sees at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fmc.method import STEP1_MODES, Step1Mode

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step1ModeRule:
    """One of :data:`fmc.method.STEP1_MODES`, as the arithmetic it stands for."""

    name: Step1Mode = "output"

    def __post_init__(self) -> None:
        if self.name not in STEP1_MODES:
            raise ValueError(f"step1_mode must be one of {STEP1_MODES}, got {self.name!r}")

    @property
    def correction(self) -> bool:
        """Whether the networks predict a change of their input rather than the output itself."""
        return self.name == "correction"

    @property
    def zero_head(self) -> bool:
        """Whether step 1's network starts with a zero head: in correction mode its change is then
        zero, so the untrained pipeline is the resampled input."""
        return self.correction

    def change(self, output: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """What a network hands on, from its ``output`` and the ``start`` it predicted from."""
        return output - start if self.correction else output

    def apply(self, change: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The prediction from a handed-on ``change`` at ``start``'s grid (a new tensor; autograd-safe)."""
        return change + start if self.correction else change

    def apply_(self, change: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in place on ``change``: no second full-size volume at inference."""
        return change.add_(start) if self.correction else change

    def patch_change(self, predictor: Predictor, residual_channel: int) -> Predictor:
        """Step 2 as the function the patches are blended with: in correction mode only what the
        network changes in its residual channel, so zero heads leave that channel to the last bit."""
        if not self.correction:
            return predictor

        def change(batch: torch.Tensor) -> torch.Tensor:
            return self.change(predictor(batch), batch[:, residual_channel : residual_channel + 1])

        return change

    def patch_stand_in(self, step_one_channel: Predictor) -> Predictor:
        """What a patch that step 2 has no time for contributes: no change in correction mode (its
        residual channel then stands), else its step-1 channel (the step-1 output)."""
        if self.correction:
            return lambda batch: torch.zeros_like(batch[:, :1])
        return step_one_channel


#: The paper's form: a network's output is the prediction.
OUTPUT = Step1ModeRule("output")
