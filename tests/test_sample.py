"""README's main command: python -m fmc.sample simulates, fuses and scores the sample case."""

from pathlib import Path

import numpy as np
import torch

from fmc.io import read_case
from fmc.network import RUNet, preset
from fmc.sample import INPUT_LAYOUT, OUTPUT_LAYOUT, ground_truth_path, main
from fmc.weights import ModelCard, save_model


def _tiny_weights(root: Path) -> Path:
    for step, channels in ((1, 1), (2, 2)):
        torch.manual_seed(step)
        config = preset("tiny", in_channels=channels)
        card = ModelCard(
            step=step,
            preset="tiny",
            config=config.to_dict(),
            normalization={"method": "percentile", "low": 2.0, "high": 99.8},
            training={"global_size": 32},
        )
        save_model(root / "any" / f"step{step}", RUNet(config), card)
    return root


def test_sample_runs_end_to_end_and_prints_scores(tmp_path, capsys):
    weights = _tiny_weights(tmp_path / "weights")
    assert main(["--workdir", str(tmp_path / "s"), "--device", "cpu", "--weights", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "N_SSIM model=" in printed and "gaussian baseline=" in printed
    [angle] = sorted((tmp_path / "s" / INPUT_LAYOUT).glob("*.tif"))
    assert ground_truth_path(angle).exists()
    fused = read_case(tmp_path / "s" / OUTPUT_LAYOUT / angle.name).volume
    assert fused.shape == read_case(angle).volume.shape and fused.dtype == np.uint16
    assert (tmp_path / "s" / OUTPUT_LAYOUT / f"{angle.stem}_preview.png").exists()


def test_sample_without_weights_says_what_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("fmc.weights.weight_roots", lambda explicit: [tmp_path / "empty"])
    assert main(["--workdir", str(tmp_path / "s"), "--device", "cpu"]) != 0
    assert "train.py" in caplog.text
    assert not list((tmp_path / "s" / OUTPUT_LAYOUT).glob("*.tif"))
