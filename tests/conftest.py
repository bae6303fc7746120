"""Shared fixtures: tiny random two-step weights written through fmc.weights (plumbing tests only)."""

from pathlib import Path

import pytest
import torch

from fmc.network import RUNet, preset
from fmc.weights import ModelCard, save_model


def write_tiny_weights(root: Path, global_size: int = 32, pipeline: dict | None = None) -> Path:
    """A tiny random step-1 + step-2 model set in ``root/any``; returns ``root``.

    ``pipeline`` replaces the cards' method settings (default: only ``global_size``)."""
    for step, channels in ((1, 1), (2, 2)):
        torch.manual_seed(step)
        config = preset("tiny", in_channels=channels)
        card = ModelCard(
            step=step,
            preset="tiny",
            config=config.to_dict(),
            normalization={"method": "percentile", "low": 2.0, "high": 99.8},
            training={
                "data": "random weights for tests",
                "pipeline": {"global_size": global_size} if pipeline is None else pipeline,
            },
        )
        save_model(root / "any" / f"step{step}", RUNet(config), card)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))
