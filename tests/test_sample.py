"""README's main command: python -m fmc.sample simulates, fuses and scores the sample case."""

import numpy as np

from fmc.io import read_case
from fmc.sample import INPUT_LAYOUT, OUTPUT_LAYOUT, ground_truth_path, main


def test_sample_runs_end_to_end_and_prints_scores(tmp_path, capsys, tiny_weights):
    weights = tiny_weights
    assert main(["--workdir", str(tmp_path / "s"), "--device", "cpu", "--weights", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "N_SSIM model=" in printed and "gaussian=" in printed and "resample=" in printed
    assert "identity=+0.0000" in printed and "SSIM(input, fused) 0." in printed
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
