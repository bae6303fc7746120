"""FitConfig: ablation presets, explicit flags win, JSON round trip, CLI --help for every subcommand."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fmc.method import DW_FORMS, MethodSettings
from fmc.training.cli import build_parser, main
from fmc.training.config import (
    ABLATIONS,
    TRAINABLE_DW_FORMS,
    DifferenceWeightingConfig,
    FitConfig,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_presets(name: str) -> None:
    config = resolve_config({}, name)
    for key, value in ABLATIONS[name].items():
        assert config.to_dict()[key] == value
    stages = {"step1-only": [1], "patch-only": [2]}.get(name, [1, 2])
    assert config.method.stages() == stages


def test_explicit_flags_override_the_preset() -> None:
    config = resolve_config({"beta": 0.5, "dw": False, "patch": 32}, "adversarial-dw")
    method = config.method
    assert (config.loss.beta, method.difference_weighting.enabled, method.patch) == (0.5, False, 32)
    assert config.method.step1_enabled and config.method.step2_enabled


def test_impossible_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="trains nothing"):
        resolve_config({"step": "2"}, "step1-only")
    with pytest.raises(ValueError, match="never stop"):
        resolve_config({"max_steps": -1, "max_epochs": -1})


def test_config_round_trip_is_plain_json(tmp_path: Path) -> None:
    config = resolve_config({"val_studies": (2, 5), "sim_shape": (8, 16, 16)})
    config.write(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["val_studies"] == [2, 5]
    assert FitConfig.from_dict(data) == config


def test_cli_flags_reach_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", "--ablation", "two-step", "--patch", "48", "--no-flips", "--val-studies", "1", "3"]
    argv += ["--sim-shape", "8", "16", "16", "--devices", "2", "--print-config"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["patch"] == 48 and data["flips"] is False and data["beta"] == 0.0
    assert data["val_studies"] == [1, 3] and data["sim_shape"] == [8, 16, 16] and data["devices"] == "2"


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    for command in ("prepare", "fit", "export", "evaluate"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


def test_train_py_help_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("prepare", "fit", "export", "evaluate"):
        assert command in result.stdout


def test_discriminator_depth_must_fit_the_patch() -> None:
    with pytest.raises(ValueError, match="disc-levels"):
        resolve_config({"patch": 8, "disc_levels": 4}, ablation="adversarial")
    assert resolve_config({"patch": 8, "disc_levels": 3}, ablation="adversarial").method.patch == 8
    assert resolve_config({"patch": 8, "disc_levels": 4, "beta": 0.0}).loss.beta == 0.0  # no discriminator


def test_fit_accepts_out_as_the_run_folder(tmp_path, capsys):
    from fmc.training.cli import main

    assert main(["fit", "--out", str(tmp_path / "run"), "--print-config"]) == 0
    assert f'"run_dir": "{tmp_path / "run"}"' in capsys.readouterr().out


#: Settings added after the shipped cards were written (their records load with the default).
NEWER_THAN_THE_SHIPPED_CARDS = {"split_seed": None}


def _shipped_fit_config(model: str) -> dict:
    card = json.loads((REPO / "resources/weights" / model / "step2.json").read_text())
    return card["training"]["fit_config"]


def test_flat_records_of_earlier_runs_load_into_the_groups() -> None:
    """The shipped cards' fit_config was written as one flat dict: it must load key for key, and a
    record from before a setting existed gets that setting's default."""
    current = _shipped_fit_config("any")
    config = FitConfig.from_dict(current)
    assert config.extra == {} and config.to_dict() == {**current, **NEWER_THAN_THE_SHIPPED_CARDS}
    assert config.data.raw_folder == current["data"] and config.method.init_weights == current["init_weights"]
    # a record written before a setting existed (the shipped cards' of 2026-12-01 had no distance_channel)
    older = {k: v for k, v in current.items() if k != "distance_channel"}
    loaded = FitConfig.from_dict(older)
    assert loaded.extra == {} and loaded.method.distance_channel is False
    assert {k: v for k, v in loaded.to_dict().items() if k in older} == older


def test_each_setting_has_one_flag_and_the_flags_are_the_stored_keys() -> None:
    flags = [flag.name for flag in FitConfig.flags()]
    assert len(flags) == len(set(flags))
    assert set(flags) == set(_shipped_fit_config("any")) - {"extra"} | set(NEWER_THAN_THE_SHIPPED_CARDS)
    fit_parser = build_parser()._subparsers._group_actions[0].choices["fit"]  # type: ignore[union-attr]
    given = {action.dest for action in fit_parser._actions}
    assert set(flags) <= given


def test_data_flag_fills_the_raw_folder_and_groups_are_typed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--data", "/raw/pairs", "--lr", "0.5", "--num-workers", "0", "--print-config"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["data"] == "/raw/pairs"
    config = FitConfig.from_dict(data)
    assert (config.data.raw_folder, config.optimiser.lr, config.hardware.num_workers) == (
        "/raw/pairs",
        0.5,
        0,
    )
    with pytest.raises(ValueError, match="gan_mode must be one of"):
        resolve_config({"gan_mode": "wgan"})


def test_difference_weighting_is_one_object_under_its_flat_flags() -> None:
    given = {"dw_form": "released", "dw_train_max_filter": 3, "dw_max_filter": 5}
    config = resolve_config(given, "adversarial-dw")
    dw = config.method.difference_weighting
    assert dw == DifferenceWeightingConfig(enabled=True, form="released", train_max_filter=3, max_filter=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dw.max_filter = 7  # type: ignore[misc]
    stored = config.to_dict()
    assert {k: stored[k] for k in ("dw", "dw_form", "dw_train_max_filter", "dw_max_filter")} == {
        "dw": True,
        "dw_form": "released",
        "dw_train_max_filter": 3,
        "dw_max_filter": 5,
    }
    assert FitConfig.from_dict(stored) == config
    settings = config.method.inference_settings()
    assert (settings.difference_weighting, settings.max_filter) == ("released", 5)
    assert resolve_config({}, "two-step").method.inference_settings().difference_weighting == "none"
    # the old flat names are stored keys only, not attributes
    assert not hasattr(config.method, "dw") and not hasattr(config.method, "dw_form")


def test_the_split_has_its_own_seed_which_defaults_to_the_run_seed(capsys) -> None:
    assert resolve_config({}).seed_of_split() == 0
    assert resolve_config({"seed": 5}).seed_of_split() == 5  # as every run before split_seed split
    assert resolve_config({"seed": 5, "split_seed": 2}).seed_of_split() == 2
    assert resolve_config({"seed": 5, "split_seed": 2}).optimiser.seed == 5
    assert FitConfig.from_dict({"seed": 7}).seed_of_split() == 7  # a record without split_seed
    assert main(["fit", "--seed", "4", "--split-seed", "9", "--print-config"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["seed"], data["split_seed"]) == (4, 9)


def test_choices_come_from_the_fields_literal_types() -> None:
    by_name = {flag.name: flag for flag in FitConfig.flags()}
    assert by_name["dw_form"].choices == TRAINABLE_DW_FORMS == tuple(f for f in DW_FORMS if f != "none")
    settings_hints = typing.get_type_hints(MethodSettings)
    assert by_name["step1_mode"].choices == typing.get_args(settings_hints["step1_mode"])
    assert by_name["step"].choices == ("1", "2", "both", "joint")
    assert by_name["sim_channels"].choices == by_name["channels"].choices == ("nucleus", "membrane")
    assert by_name["ablation"].choices == tuple(ABLATIONS)  # a dict owns these: the knob's own
    assert by_name["lr"].choices is None
    with pytest.raises(ValueError, match="val_mode must be one of"):
        resolve_config({"val_mode": "sideways"})
    with pytest.raises(ValueError, match="channels must be one of"):
        resolve_config({"channels": ("nucleus", "cytoplasm")})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--accelerator", "tpu"])


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"dw_max_filter": 4}, "--dw-max-filter must be odd and >= 1, got 4"),
        ({"patch": 4}, "--patch must be >= 8, got 4"),
        ({"global_size": 7}, "--global-size must be >= 8, got 7"),
    ],
)
def test_the_inference_limits_are_method_settings_checks(given, says) -> None:
    with pytest.raises(ValueError) as refused:
        resolve_config(given)
    assert str(refused.value) == says
    field = {"dw_max_filter": "max_filter"}.get(next(iter(given)), next(iter(given)))
    with pytest.raises(ValueError, match=f"^{field} must be"):  # the same limit, where it is owned
        MethodSettings(**{field: next(iter(given.values()))})
