"""Shared fixtures: tiny random two-step weights written through fmc.weights (plumbing tests only),
and the small volumes and warning capture of the fmc.io tests."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fmc.network import RUNet, preset
from fmc.weights import ModelCard, save_model

#: inference.py flags for a seconds-long CPU run on the tiny test weights (no time planning).
FAST_INFERENCE_FLAGS = [
    "--device",
    "cpu",
    "--patch",
    "16",
    "--overlap",
    "0.25",
    "--global-size",
    "32",
    "--budget-seconds",
    "0",
]


def inference_args(input_dir: Path, output_dir: Path, weights: Path, *extra: str) -> list[str]:
    """inference.py's command line for one fast CPU run on ``weights``; ``extra`` flags win."""
    paths = ["--input", str(input_dir), "--output", str(output_dir), "--weights", str(weights)]
    return [*paths, *FAST_INFERENCE_FLAGS, *extra]


def write_tiny_weights(
    root: Path, global_size: int = 32, pipeline: dict | None = None, step2_channels: int = 2
) -> Path:
    """A tiny random step-1 + step-2 model set in ``root/any``; returns ``root``.

    ``pipeline`` replaces the cards' method settings (default: only ``global_size``);
    ``step2_channels``: the step-2 network's input channels."""
    for step, channels in ((1, 1), (2, step2_channels)):
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


IO_SHAPE = (8, 16, 16)
IO_SPACING = (1.0, 0.195, 0.39)  # z, y, x: x != y so a swapped axis shows


def random_volume(shape: tuple[int, ...] = IO_SHAPE, dtype: type = np.uint16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, size=shape).astype(dtype)


def fmc_io_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings fmc.io logged in this test (each names the file and the fault)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "fmc.io"]


@pytest.fixture
def capture_fmc_io_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fmc.io")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, saying why, on a machine without CUDA (CI runs them nowhere)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
