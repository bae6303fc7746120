"""Read our own Lightning checkpoints without executing code (``torch.load(weights_only=True)``).

The module stores only tensors and plain dicts in them (config as a dict, network configs
as dicts), so the safe loader suffices; a checkpoint that needs pickle is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict; raises ValueError naming the file when it is not a safe fmc checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not loadable with weights_only=True (refusing pickle): {error}") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "stage" not in hparams or "config" not in hparams:
        raise ValueError(
            f"{path}: not a checkpoint written by train.py fit (no stage/config hyper-parameters)"
        )
    return checkpoint


def sub_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of one submodule (``prefix`` without the dot), with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in state_dict.items() if k.startswith(start)}


def step1_from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, network config) of the step-1 network in a stage-1 or stage-2 checkpoint."""
    checkpoint = load_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    if int(hparams["stage"]) == 1:
        return sub_state(checkpoint["state_dict"], "generator"), dict(hparams["network"])
    if hparams.get("step1_network") is None:
        raise ValueError(f"{path}: a patch-only (no step 1) checkpoint has no step-1 network")
    return sub_state(checkpoint["state_dict"], "step1_net"), dict(hparams["step1_network"])
