"""The inference pipeline as a training run's model is run: by validation, by step-1 outputs, by export.

Why one function: validation must score what ``inference.py`` will run on the exported weights,
and the step-1 outputs step 2 trains on must be what the pipeline gives it; a second hand-made
translation of ``FitConfig`` into ``PipelineConfig`` would drift from the first.
"""

from __future__ import annotations

import torch

from fmc.acceleration import KernelOptions
from fmc.pipeline import PipelineConfig
from fmc.tiling import TilingConfig
from fmc.training.config import FitConfig


def network_precision(device: torch.device, trainer_precision: str) -> str:
    """bf16 on CUDA when the trainer runs in bf16, float32 otherwise: the networks run as they train."""
    return "bf16" if device.type == "cuda" and "bf16" in trainer_precision else "fp32"


def pipeline_config_of(
    config: FitConfig, stage: int, device: torch.device, trainer_precision: str, *, with_dw: bool
) -> PipelineConfig:
    """The pipeline of one stage's model: step 1 alone for stage 1, both steps (as the model has
    them) for stage 2; DW in the run's form when ``with_dw`` (the final stage), else none."""
    settings = config.method.inference_settings()
    return PipelineConfig(
        kernels=KernelOptions(precision=network_precision(device, trainer_precision), channels_last=False),
        step1=stage == 1 or config.method.step1_enabled,
        step2=stage == 2,
        difference_weighting=settings.difference_weighting if with_dw else "none",
        max_filter=settings.max_filter,
        step1_mode=settings.step1_mode,
        global_size=settings.global_size,
        tiling=TilingConfig(
            patch=(config.method.patch,) * 3,
            overlap=config.validation.val_overlap,
            batch=config.validation.val_batch,
        ),
    )
