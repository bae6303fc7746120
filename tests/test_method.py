"""The model card owns the method's settings; flags override them, and the log says which applied."""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_weights

from fmc import method
from fmc.infer import main
from fmc.io import read_case
from fmc.method import MIN_SIZE, MethodSettings
from fmc.simulated_tiff import write_volume

FAST = ["--device", "cpu", "--patch", "16", "--overlap", "0.25", "--budget-seconds", "0"]


def _weights(root: Path, pipeline: dict) -> Path:
    return write_tiny_weights(root, pipeline=pipeline)


def _fuse(tmp: Path, weights: Path, name: str, *flags: str) -> np.ndarray:
    inputs = tmp / "in"
    if not inputs.is_dir():
        inputs.mkdir()
        rng = np.random.default_rng(0)
        write_volume(
            inputs / "image_0_nucleus_angle.tif",
            rng.integers(100, 4000, (12, 40, 40), dtype=np.uint16),
            spacing=(1.0, 0.39, 0.39),
            channel="nucleus",
            study=1,
            style="imagej",
        )
    out = tmp / name
    assert main(["--input", str(inputs), "--output", str(out), "--weights", str(weights), *FAST, *flags]) == 0
    return read_case(out / "image_0_nucleus_angle.tif").volume


def test_a_card_without_dw_gives_the_bytes_of_no_dw(tmp_path, caplog):
    card_off = _weights(tmp_path / "off", {"global_size": 16, "difference_weighting": False})
    card_default = _weights(tmp_path / "default", {"global_size": 16})
    with caplog.at_level(logging.INFO):
        from_card = _fuse(tmp_path, card_off, "card")
    assert "difference_weighting=none (card)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        from_flag = _fuse(tmp_path, card_default, "flag", "--no-dw")
    assert "difference_weighting=none (flag)" in caplog.text
    assert np.array_equal(from_card, from_flag)
    with_dw = _fuse(tmp_path, card_default, "dw")  # the default card: DW as the paper reads
    assert not np.array_equal(with_dw, from_flag)
    assert np.array_equal(_fuse(tmp_path, card_off, "forced", "--dw", "paper"), with_dw)  # a flag wins


def test_a_card_with_the_distance_channel_loads_and_runs(tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    channels = ["image", "step1", "distance"]
    inputs = {"global_size": 16, "difference_weighting": "none", "step2_inputs": channels}
    weights = write_tiny_weights(tmp_path / "w", pipeline=inputs, step2_channels=3)
    with caplog.at_level(logging.INFO):
        fused = _fuse(tmp_path, weights, "distance")
    assert "step2_inputs=('image', 'step1', 'distance') (card)" in caplog.text
    # the channel reaches the network: the same weights blind to it give other bytes
    blind = write_tiny_weights(tmp_path / "blind", pipeline=inputs, step2_channels=3)
    tensors = load_file(blind / "any" / "step2.safetensors")
    first = "encoders.0.0.0.conv1.weight"
    tensors[first] = torch.cat([tensors[first][:, :2], torch.zeros_like(tensors[first][:, 2:])], dim=1)
    save_file(tensors, blind / "any" / "step2.safetensors")
    assert not np.array_equal(_fuse(tmp_path, blind, "blind"), fused)


def test_a_card_asking_for_a_channel_the_pipeline_cannot_build_is_refused(tmp_path, caplog):
    inputs = {"global_size": 16, "step2_inputs": ["image", "step1", "curvature"]}
    weights = write_tiny_weights(tmp_path / "w", pipeline=inputs, step2_channels=3)
    inputs_dir = tmp_path / "in"
    _fuse(tmp_path, write_tiny_weights(tmp_path / "ok"), "ok")  # writes the input case
    out = tmp_path / "refused"
    with caplog.at_level(logging.ERROR):
        code = main(["--input", str(inputs_dir), "--output", str(out), "--weights", str(weights), *FAST])
    assert code != 0
    assert ".json: training.pipeline.step2_inputs" in caplog.text and "'curvature'" in caplog.text
    assert "distance" in caplog.text
    assert not (out / "image_0_nucleus_angle.tif").exists()
    with pytest.raises(ValueError, match="takes 3"):
        MethodSettings(step2_inputs=("image", "step1")).step2_channels(3)


def test_settings_read_old_and_new_cards_and_refuse_unknown_forms():
    assert MethodSettings.from_card({}) == MethodSettings()
    assert MethodSettings.from_card({"difference_weighting": True}).difference_weighting == "paper"
    assert MethodSettings.from_card({"difference_weighting": False}).difference_weighting == "none"
    settings = MethodSettings(
        difference_weighting="released", step1_mode="correction", global_size=64, patch=48
    )
    assert MethodSettings.from_card({**settings.to_card(), "step1": True}) == settings  # unknown keys ignored
    assert settings.override(difference_weighting=None, max_filter=5).max_filter == 5
    with pytest.raises(ValueError, match="difference_weighting"):
        MethodSettings(difference_weighting="half")
    with pytest.raises(ValueError, match="step1_mode"):
        MethodSettings(step1_mode="sideways")
    with pytest.raises(ValueError, match="odd"):
        MethodSettings(max_filter=4)


def test_contradicting_dw_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="contradicts"):
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--no-dw", "--dw", "paper"])


def test_the_patch_is_the_cards_unless_a_flag_gives_it():
    card = MethodSettings(patch=48)
    assert card.tile_patch() == card.tile_patch(None) == (48, 48, 48)
    assert card.tile_patch(16) == (16, 16, 16)
    assert MethodSettings.from_card({}).tile_patch() == (method.DEFAULT_PATCH,) * 3  # a card without one
    with pytest.raises(ValueError, match=f"^patch must be >= {MIN_SIZE}, got 4$"):
        card.tile_patch(4)  # the flag is checked as the setting is


def test_each_size_limit_names_its_own_setting():
    with pytest.raises(ValueError, match=r"^global_size must be >= 8, got 4$"):
        MethodSettings(global_size=4)
    with pytest.raises(ValueError, match=r"^patch must be >= 8, got 7$"):
        MethodSettings(patch=7)
    assert MethodSettings(global_size=MIN_SIZE, patch=MIN_SIZE).patch == MIN_SIZE


def test_each_choice_tuple_is_its_literal_type():
    hints = typing.get_type_hints(MethodSettings)
    assert typing.get_args(hints["difference_weighting"]) == method.DW_FORMS == ("paper", "released", "none")
    assert typing.get_args(hints["step1_mode"]) == method.STEP1_MODES == ("output", "correction")
    assert typing.get_args(typing.get_args(hints["step2_inputs"])[0]) == method.STEP2_INPUTS
    assert typing.get_args(method.TrainableDWForm) == ("paper", "released")
    assert method.CHANNELS == ("nucleus", "membrane")


def _patch_run(tmp_path: Path, weights: Path, name: str, *flags: str) -> list[int]:
    _fuse(tmp_path, write_tiny_weights(tmp_path / "first"), "first")  # writes the input case once
    report = tmp_path / f"{name}.json"
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / name), "--weights", str(weights)]
    args += ["--device", "cpu", "--overlap", "0.25", "--budget-seconds", "0", "--report", str(report)]
    assert main([*args, *flags]) == 0
    return json.loads(report.read_text())["cases"][0]["figures"]["step2"]["patch"]


def test_inference_tiles_with_the_cards_patch_unless_patch_is_given(tmp_path):
    weights = _weights(tmp_path / "w", {"global_size": 16, "patch": 24})
    assert _patch_run(tmp_path, weights, "card") == [24, 24, 24]
    assert _patch_run(tmp_path, weights, "flag", "--patch", "16") == [16, 16, 16]
