"""FusionDataModule: the split it trains and validates on, and a warning when nothing validates."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fmc.training.config import FitConfig
from fmc.training.datamodule import FusionDataModule


def _setup(sim_cache: Path, tmp_path: Path, **settings: object) -> FusionDataModule:
    config = FitConfig.from_dict(
        {"run_dir": str(tmp_path), "cache": str(sim_cache), "global_size": 32, **settings}
    )
    module = FusionDataModule(config, 1)
    module.setup("fit")
    return module


def test_a_split_without_validation_cases_warns(
    sim_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fmc.training.datamodule")
    module = _setup(sim_cache, tmp_path, val_fraction=0.0)
    assert module.val_cases == [] and len(module.train_cases) == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no validation case" in text and "--val-min-id" in text for text in warned)


def test_a_split_with_validation_cases_does_not_warn(
    sim_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fmc.training.datamodule")
    module = _setup(sim_cache, tmp_path, val_fraction=0.5)
    assert len(module.val_cases) == 2 and len(module.train_cases) == 2  # one id of two, both channels
    assert not [r for r in caplog.records if "no validation case" in r.getMessage()]


def test_the_split_is_seeded_by_split_seed_else_by_seed(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fmc.data.split import make_split
    from fmc.training.datamodule import resolve_split

    cases = [
        SimpleNamespace(id=f"image_{i}_nucleus", image_id=i, channel="nucleus", study=1) for i in range(20)
    ]
    plain = [(c.id, c.image_id, c.channel, c.study) for c in cases]

    def split(**settings: object) -> list:
        return resolve_split(FitConfig.from_dict({"run_dir": str(tmp_path), **settings}), cases)  # type: ignore[arg-type]

    assert split(seed=5) == make_split(plain, seed=5)  # no split_seed: the run's seed, as before
    assert split(seed=5, split_seed=2) == make_split(plain, seed=2) != make_split(plain, seed=5)
