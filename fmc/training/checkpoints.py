"""Read our own Lightning checkpoints without executing code (``torch.load(weights_only=True)``).

The module stores only tensors and plain dicts in them (config as a dict, network configs
as dicts), so the safe loader suffices; a checkpoint that needs pickle is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmc.weights import load_model


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


def _exported(path: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, network config) of an exported network (``.safetensors`` + card, no pickle)."""
    loaded = load_model(path)
    if loaded.card.step != step:
        raise ValueError(f"{path}: a step-{loaded.card.step} network, expected step {step}")
    return loaded.network.state_dict(), dict(loaded.card.config)


def is_exported(path: Path) -> bool:
    """An exported network (a .safetensors file or its stem) rather than a fit checkpoint."""
    return path.suffix != ".ckpt"


def step1_from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, network config) of the step-1 network in a stage-1 or stage-2 checkpoint, or of
    an exported step-1 network (``resources/weights/any/step1.safetensors``)."""
    if is_exported(path):
        return _exported(path, 1)
    checkpoint = load_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    if int(hparams["stage"]) == 1:
        return sub_state(checkpoint["state_dict"], "generator"), dict(hparams["network"])
    if hparams.get("step1_network") is None:
        raise ValueError(f"{path}: a patch-only (no step 1) checkpoint has no step-1 network")
    return sub_state(checkpoint["state_dict"], "step1_net"), dict(hparams["step1_network"])


def generator_init(path: Path, stage: int) -> dict[str, torch.Tensor]:
    """The stage's network weights in a fit checkpoint of that stage or an exported step-``stage`` network."""
    if is_exported(path):
        return _exported(path, stage)[0]
    checkpoint = load_checkpoint(path)
    if int(checkpoint["hyper_parameters"]["stage"]) != stage:
        raise ValueError(
            f"{path}: a stage-{checkpoint['hyper_parameters']['stage']} checkpoint, expected stage {stage}"
        )
    return sub_state(checkpoint["state_dict"], "generator")


def widen_inputs(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: Path
) -> dict[str, torch.Tensor]:
    """``source`` shaped as ``target``: tensors that take fewer input channels (dim 1) get zeros for
    the new ones, so the widened network computes what the source did until training moves them."""
    if set(source) != set(target):
        missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
        raise ValueError(
            f"{origin}: another architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    widened = {}
    for key, want in target.items():
        have = source[key]
        if have.shape == want.shape:
            widened[key] = have
            continue
        if (
            have.ndim < 2
            or have.shape[0] != want.shape[0]
            or have.shape[2:] != want.shape[2:]
            or have.shape[1] > want.shape[1]
        ):
            raise ValueError(
                f"{origin}: {key} is {tuple(have.shape)}, this run's network needs {tuple(want.shape)}"
            )
        padded = torch.zeros_like(want)
        padded[:, : have.shape[1]] = have
        widened[key] = padded
    return widened
