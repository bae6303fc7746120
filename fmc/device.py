"""Which device a command runs on: ``auto`` | ``cuda`` | ``cpu``, the same rule for every command.

Why a check beyond ``torch.cuda.is_available()``: a CUDA device can be present but unable to run
(a driver too old for the image's kernels); that must show before the first case, not in its
middle, and the run goes on on the CPU with a warning.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


def select_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present and says so either way; ``cuda`` without CUDA falls back to CPU."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")
    if requested == "cpu":
        log.info("device: cpu (requested)")
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        try:  # start the context now: a driver that cannot run fails here, not in the middle of a case
            name = torch.cuda.get_device_name(device)
            torch.ones(1, device=device).add_(1).cpu()
        except Exception as error:
            log.warning("device: CUDA is present but unusable (%s); running on CPU (much slower)", error)
            return torch.device("cpu")
        log.info("device: cuda (%s)", name)
        return device
    log.warning("device: CUDA is not available, running on CPU (this is much slower)")
    return torch.device("cpu")
