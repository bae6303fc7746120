"""A skipped step reads none of its files but its card (issue 26): ``--no-step2`` with a damaged
``step2.safetensors`` still fuses, while the card is still read and checked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import inference_args, write_tiny_weights

from fmc.infer import main
from fmc.simulated_tiff import write_volume
from fmc.weights import WeightsError, discover_models

CASE = "image_1_nucleus_angle.tif"


@pytest.fixture
def damaged_step2(tmp_path: Path) -> Path:
    """Tiny weights whose step2.safetensors is garbage (a truncated download, a bad disk)."""
    root = write_tiny_weights(tmp_path / "weights")
    (root / "any" / "step2.safetensors").write_bytes(b"\x00not a safetensors file")
    return root


def _input(folder: Path) -> Path:
    folder.mkdir(parents=True)
    volume = np.random.default_rng(0).integers(100, 4000, size=(12, 40, 40), dtype=np.uint16)
    write_volume(folder / CASE, volume, spacing=(1.0, 0.39, 0.39), channel="nucleus", study=3)
    return folder


def test_no_step2_fuses_with_a_damaged_step2_file(tmp_path, damaged_step2, caplog):
    caplog.set_level(logging.INFO, logger="fmc")
    code = main(inference_args(_input(tmp_path / "in"), tmp_path / "out", damaged_step2, "--no-step2"))
    assert code == 0, caplog.text
    assert (tmp_path / "out" / CASE).is_file()
    assert "loaded step-2 model" not in caplog.text
    assert "loaded step-1 model" in caplog.text


def test_the_damage_is_real_when_step2_runs(tmp_path, damaged_step2, caplog):
    code = main(inference_args(_input(tmp_path / "in"), tmp_path / "out", damaged_step2))
    assert code == 1
    assert "step2.safetensors: not a readable safetensors file" in caplog.text
    assert not (tmp_path / "out" / CASE).exists()


def test_a_skipped_steps_card_is_still_checked(tmp_path, caplog):
    root = write_tiny_weights(tmp_path / "weights")
    card = root / "any" / "step2.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "format_version": 99}))
    code = main(inference_args(_input(tmp_path / "in"), tmp_path / "out", root, "--no-step2"))
    assert code == 1
    assert f"{card}: model card format_version 99 is not supported" in caplog.text


def test_discovery_skips_the_tensors_of_a_skipped_step(tmp_path, damaged_step2):
    models = discover_models(damaged_step2, "nucleus", None, skip=("step2",))
    assert models.step1 is not None and models.step1.network is not None
    assert models.step2 is not None and models.step2.network is None
    assert models.step2.card.step == 2  # the card was read: the pipeline takes its settings from it
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        discover_models(damaged_step2, "nucleus", None)


def test_no_step1_skips_the_step1_tensors(tmp_path, caplog):
    root = write_tiny_weights(tmp_path / "weights")
    (root / "any" / "step1.safetensors").write_bytes(b"garbage")
    caplog.set_level(logging.INFO, logger="fmc")
    code = main(inference_args(_input(tmp_path / "in"), tmp_path / "out", root, "--no-step1"))
    assert code == 0, caplog.text
    assert "loaded step-1 model" not in caplog.text
