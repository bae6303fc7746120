"""Model files (safetensors + JSON card), pickle refusal, and discovery order / fallbacks."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

import fmc.weights as weights
from fmc.network import RUNet, preset
from fmc.weights import (
    FORMAT_VERSION,
    ModelCard,
    WeightsError,
    WeightsNotFoundError,
    discover_models,
    load_model,
    save_model,
    weight_roots,
)


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point /opt/ml/model and resources/weights at empty temp folders so real weights never interfere."""
    platform, repo = tmp_path / "opt_ml_model", tmp_path / "repo_weights"
    monkeypatch.setenv("FMC_MODEL_DIR", str(platform))
    monkeypatch.setattr(weights, "REPO_WEIGHTS", repo)
    return platform, repo


def _card(step: int, in_channels: int) -> ModelCard:
    return ModelCard(
        step=step,
        preset="tiny",
        config=preset("tiny", in_channels).to_dict(),
        normalization={"method": "percentile", "low": 2.0, "high": 99.8},
        training={"data": "random weights for tests"},
    )


def _write(folder: Path, steps: tuple[int, ...] = (1, 2), seed: int = 0) -> Path:
    for step in steps:
        torch.manual_seed(seed + step)
        in_channels = 1 if step == 1 else 2
        save_model(folder / f"step{step}", RUNet(preset("tiny", in_channels)), _card(step, in_channels))
    return folder


def test_save_then_load_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = RUNet(preset("tiny", 2)).eval()
    save_model(tmp_path / "m" / "step2", net, _card(2, 2))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["step2.json", "step2.safetensors"]
    loaded = load_model(tmp_path / "m" / "step2")
    assert loaded.path == tmp_path / "m" / "step2.safetensors"
    assert loaded.card == _card(2, 2) and loaded.card.format_version == FORMAT_VERSION
    assert not loaded.network.training
    x = torch.randn(1, 2, 11, 13, 9)
    with torch.no_grad():
        expected, got = net(x), loaded.network(x)
    assert not torch.equal(expected, x[:, :1])  # random head: the comparison below means something
    assert torch.equal(expected, got)
    card = json.loads((tmp_path / "m" / "step2.json").read_text())
    assert card["config"]["in_channels"] == 2 and card["config"]["channels"] == [4, 8, 8]
    # .safetensors / .json spellings of the stem name the same model
    assert torch.equal(load_model(tmp_path / "m" / "step2.safetensors").network(x), got)


def test_save_refuses_a_card_that_does_not_describe_the_network(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        save_model(tmp_path / "step1", RUNet(preset("tiny", 1)), _card(1, 2))
    assert not list(tmp_path.iterdir())


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path: Path, no_unpickling: None) -> None:
    state = RUNet(preset("tiny")).state_dict()
    torch.save(state, tmp_path / "step1.pt")
    for path in (tmp_path / "step1.pt", tmp_path / "step1"):  # by name, and as the only file of the stem
        with pytest.raises(WeightsError, match="pickle-based checkpoints are refused") as info:
            load_model(path)
        assert "train.py export" in str(info.value) and "step1.pt" in str(info.value)
    # a pickle renamed to .safetensors is refused too
    torch.save(state, tmp_path / "step2.safetensors")
    (tmp_path / "step2.json").write_text(json.dumps(dataclasses.asdict(_card(1, 1))))
    with pytest.raises(WeightsError, match="pickle-based checkpoints are refused"):
        load_model(tmp_path / "step2")
    # discovery does not silently skip a pickle-only model folder
    (tmp_path / "any").mkdir()
    torch.save(state, tmp_path / "any" / "step1.ckpt")
    with pytest.raises(WeightsError, match="pickle"):
        discover_models(tmp_path, "nucleus", None)


def test_card_with_another_format_version_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, steps=(1,))
    card_path = tmp_path / "step1.json"
    card = json.loads(card_path.read_text())
    card["format_version"] = FORMAT_VERSION + 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="format_version 2 is not supported") as info:
        load_model(tmp_path / "step1")
    assert "step1.json" in str(info.value)


def test_tensors_not_matching_the_card_name_the_file(tmp_path: Path) -> None:
    _write(tmp_path, steps=(1,))
    card_path = tmp_path / "step1.json"
    card = json.loads(card_path.read_text())
    card["config"]["channels"] = [4, 8, 16]
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=r"step1\.safetensors: tensors do not match"):
        load_model(tmp_path / "step1")


def test_weight_roots_order_and_dedup(tmp_path: Path, isolated_roots: tuple[Path, Path]) -> None:
    platform, repo = isolated_roots
    explicit = tmp_path / "explicit"
    assert weight_roots(explicit) == [explicit, platform, repo]
    assert weight_roots(None) == [platform, repo]
    assert weight_roots(platform) == [platform, repo]


def test_discovery_order_explicit_then_platform_then_resources(
    tmp_path: Path, isolated_roots: tuple[Path, Path]
) -> None:
    platform, repo = isolated_roots
    explicit = tmp_path / "explicit"
    for root in (explicit, platform, repo):
        _write(root / "any")
    assert discover_models(explicit, "nucleus", None).folder == explicit / "any"
    assert discover_models(None, "nucleus", None).folder == platform / "any"
    for path in (platform / "any").iterdir():
        path.unlink()
    models = discover_models(None, "nucleus", None)
    assert models.folder == repo / "any"
    assert models.step1 is not None and models.step1.card.step == 1
    assert models.step2 is not None and models.step2.network.config.in_channels == 2


def test_channel_folder_falls_back_to_any_and_study_is_preferred(tmp_path: Path) -> None:
    _write(tmp_path / "any")
    assert discover_models(tmp_path, "membrane", 3).folder == tmp_path / "any"
    _write(tmp_path / "nucleus")
    _write(tmp_path / "nucleus" / "study_3")
    assert discover_models(tmp_path, "nucleus", 3).folder == tmp_path / "nucleus" / "study_3"
    assert discover_models(tmp_path, "nucleus", 2).folder == tmp_path / "nucleus"
    assert discover_models(tmp_path, "nucleus", None).folder == tmp_path / "nucleus"
    assert discover_models(tmp_path, "membrane", 3).folder == tmp_path / "any"
    assert discover_models(tmp_path, "unknown", None).folder == tmp_path / "any"


def test_flat_root_and_single_step_sets(tmp_path: Path) -> None:
    _write(tmp_path, steps=(2,))
    card = json.loads((tmp_path / "step2.json").read_text())
    card["training"]["pipeline"] = {"step1": False}  # a one-step model says so (issue 22, C)
    (tmp_path / "step2.json").write_text(json.dumps(card))
    models = discover_models(tmp_path, "nucleus", None)
    assert models.folder == tmp_path and models.step1 is None and models.step2 is not None


def test_missing_weights_explain_where_to_get_them(tmp_path: Path, isolated_roots: tuple[Path, Path]) -> None:
    platform, repo = isolated_roots
    (platform / "nucleus").mkdir(parents=True)  # exists but holds no model
    with pytest.raises(WeightsNotFoundError) as info:
        discover_models(None, "nucleus", 1)
    message = str(info.value)
    assert str(platform) in message and str(repo) in message
    assert "train.py export" in message and "--weights" in message and "resources/weights" in message
    with pytest.raises(WeightsNotFoundError, match="nowhere: no such folder"):
        discover_models(tmp_path / "nowhere", "nucleus", None)
    with pytest.raises(WeightsNotFoundError, match="no such model file"):
        load_model(tmp_path / "step1")


def test_incomplete_model_is_ignored_not_loaded(tmp_path: Path) -> None:
    _write(tmp_path / "any")
    _write(tmp_path / "nucleus", steps=(1,))
    (tmp_path / "nucleus" / "step1.json").unlink()  # weights without a card: not a model
    assert discover_models(tmp_path, "nucleus", None).folder == tmp_path / "any"
