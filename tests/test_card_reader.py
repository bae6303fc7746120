"""Issue 22, the model folder as a whole: card values of the wrong type or range (A), cards that
disagree (D), half a model (C), broken weights and the float16 hint (E)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import inference_args, write_tiny_weights
from safetensors.torch import load_file, save_file

from fmc import acceleration
from fmc.card_reader import CardError, check_pipeline, matches
from fmc.infer import main
from fmc.method import MethodSettings
from fmc.safeguards import take_input_where_non_finite_
from fmc.simulated_tiff import write_volume
from fmc.weights import WeightsError, discover_models

CASE = "image_1_nucleus_angle.tif"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return write_tiny_weights(tmp_path / "weights")


def _input(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).integers(100, 4000, size=(12, 40, 40), dtype=np.uint16)
    write_volume(folder / CASE, volume, spacing=(1.0, 0.39, 0.39), channel="nucleus", study=1)
    return folder


def _edit(card: Path, edit) -> None:
    data = json.loads(card.read_text())
    edit(data)
    card.write_text(json.dumps(data))


def _run(tmp_path: Path, weights: Path, *extra: str) -> int:
    return main(inference_args(_input(tmp_path / "in"), tmp_path / "out", weights, *extra))


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _set_pipeline(key: str, value):
    return lambda data: data["training"]["pipeline"].__setitem__(key, value)


# ------------------------------------------------------------------ A: wrong types and ranges


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("max_filter", "3", 'training.pipeline.max_filter: "3" is not an integer'),
        ("patch", None, "training.pipeline.patch: null is not an integer"),
        ("global_size", "64", 'training.pipeline.global_size: "64" is not an integer'),
        ("global_size", 64.5, "training.pipeline.global_size: 64.5 is not an integer"),
        ("step2_inputs", 5, "training.pipeline.step2_inputs: 5 is not a list"),
        ("global_size", 4096, "training.pipeline.global_size: 4096 is larger than 1024"),
        ("patch", 100000, "training.pipeline.patch: 100000 is larger than 1024"),
        ("max_filter", 4, "training.pipeline.max_filter: max_filter must be odd"),
        ("difference_weighting", 5, "training.pipeline.difference_weighting: 5 is not a string"),
        ("step1_mode", ["output"], "training.pipeline.step1_mode: ['output'] is not a string"),
        ("step2_inputs", ["image", 2], "training.pipeline.step2_inputs: ['image', 2] is not a list"),
        ("patch", 4, "training.pipeline.patch: patch must be >= 8, got 4"),
        ("step2", "yes", 'training.pipeline.step2: "yes" is not true or false'),
    ],
)
def test_a_wrong_card_value_is_one_line_naming_card_and_key(tmp_path, weights, caplog, key, value, says):
    card = weights / "any" / "step2.json"
    _edit(card, _set_pipeline(key, value))
    assert _run(tmp_path, weights) == 1
    assert any(f"{card}: {says}" in line for line in _errors(caplog)), caplog.text
    assert "retrying" not in caplog.text and not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.__setitem__("training", "oops"), 'training: "oops" is not an object'),
        (lambda d: d["training"].__setitem__("pipeline", [1]), "training.pipeline: [1] is not an object"),
        (lambda d: d["normalization"].__setitem__("low", "2"), 'normalization.low: "2" is not a number'),
        (lambda d: d["normalization"].__setitem__("low", 1.0), "normalization.low: 1.0, but this pipeline"),
        (lambda d: d["config"].__setitem__("groups", 2.5), "config.groups: 2.5 is not an integer"),
    ],
)
def test_a_wrong_card_block_is_one_line(tmp_path, weights, caplog, edit, says):
    card = weights / "any" / "step1.json"
    _edit(card, edit)
    assert _run(tmp_path, weights) == 1
    assert any(f"{card}: {says}" in line for line in _errors(caplog)), caplog.text


def test_unknown_pipeline_keys_are_named(tmp_path, weights, caplog):
    card = weights / "any" / "step2.json"
    _edit(card, lambda d: d["training"]["pipeline"].update(tta=True, overlap=0.9))
    assert _run(tmp_path, weights) == 0
    named = f"{card}: training.pipeline keys ['overlap', 'tta'] are not settings of this pipeline"
    assert named in caplog.text


def test_the_reader_follows_the_method_settings_fields():
    # every default passes the reader: a field added to MethodSettings is covered with its type
    check_pipeline(Path("card.json"), MethodSettings().to_card())
    assert matches(1, float) and not matches(True, int) and not matches(64.5, int)
    with pytest.raises(CardError, match=r"card\.json: training\.pipeline\.step1_mode"):
        check_pipeline(Path("card.json"), {"step1_mode": 3})


def test_the_shipped_cards_pass_the_reader():
    root = Path(__file__).resolve().parent.parent / "resources" / "weights"
    for channel in ("any", "nucleus"):
        models = discover_models(root, channel, None, skip=("step1", "step2"))
        assert models.step1 is not None and models.step2 is not None


# ------------------------------------------------------------------ D: the steps' cards disagree


@pytest.mark.parametrize(("key", "value"), [("step1_mode", "correction"), ("global_size", 48)])
def test_cards_that_disagree_are_refused(tmp_path, weights, caplog, key, value):
    _edit(weights / "any" / "step2.json", _set_pipeline(key, value))
    _edit(weights / "any" / "step1.json", _set_pipeline(key, "output" if key == "step1_mode" else 32))
    assert _run(tmp_path, weights) == 1
    lines = [line for line in _errors(caplog) if f"training.pipeline.{key}" in line]
    assert any("must describe one method" in line for line in lines), caplog.text


def test_a_bogus_setting_in_step1s_card_is_caught(tmp_path, weights, caplog):
    card = weights / "any" / "step1.json"
    _edit(card, _set_pipeline("difference_weighting", "bogus"))
    assert _run(tmp_path, weights) == 1
    assert any(f"{card}: training.pipeline.difference_weighting" in line for line in _errors(caplog))


# ------------------------------------------------------------------ C: half a model


def test_a_weights_folder_with_step1_only_is_refused(tmp_path, weights, caplog):
    for suffix in (".json", ".safetensors"):
        (weights / "any" / f"step2{suffix}").unlink()
    assert _run(tmp_path, weights) == 1
    assert any("step2.safetensors + step2.json missing" in line for line in _errors(caplog)), caplog.text
    assert not (tmp_path / "out" / CASE).exists()


def test_a_half_study_folder_beside_a_complete_one_is_refused(tmp_path, weights, caplog):
    study = weights / "any" / "study_1"
    study.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(weights / "any" / f"step1{suffix}", study / f"step1{suffix}")
    assert _run(tmp_path, weights) == 1
    assert any(f"{study} holds step1 only" in line for line in _errors(caplog)), caplog.text


def test_a_one_step_model_that_says_so_runs(tmp_path, weights):
    for suffix in (".json", ".safetensors"):
        (weights / "any" / f"step2{suffix}").unlink()
    _edit(weights / "any" / "step1.json", _set_pipeline("step2", False))
    assert _run(tmp_path, weights) == 0


def test_no_step2_needs_no_step2_files(tmp_path, weights):
    for suffix in (".json", ".safetensors"):
        (weights / "any" / f"step2{suffix}").unlink()
    assert _run(tmp_path, weights, "--no-step2") == 0


# ------------------------------------------------------------------ E: broken weights, the float16 hint


def test_nan_weights_are_refused_naming_the_file(tmp_path, weights, caplog):
    path = weights / "any" / "step2.safetensors"
    tensors = {name: torch.full_like(t, float("nan")) for name, t in load_file(str(path)).items()}
    save_file(tensors, str(path))
    assert _run(tmp_path, weights) == 1
    assert any(f"{path}: " in line and "NaN or Inf" in line for line in _errors(caplog)), caplog.text
    assert not (tmp_path / "out" / CASE).exists()
    with pytest.raises(WeightsError, match="NaN or Inf"):
        discover_models(weights, "nucleus", None)


@pytest.mark.parametrize(("precision", "hinted"), [("fp32", False), ("fp16-weights", True)])
def test_the_float16_hint_appears_only_where_float16_ran(caplog, monkeypatch, precision, hinted):
    monkeypatch.setattr(acceleration, "_last_precision", [precision])
    prediction = torch.zeros(4, 4, 4)
    prediction[0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        assert take_input_where_non_finite_(prediction, torch.ones(4, 4, 4)) == 1
    assert ("float16 overflow" in caplog.text) is hinted
    assert ("--precision fp32" in caplog.text) is hinted
