"""Shared tiny simulated data for the training tests: 4 pairs of 24x64x64, cache with 32^3 global volumes."""

from __future__ import annotations

from pathlib import Path

import pytest

SIM_SHAPE = (24, 64, 64)
GLOBAL_SIZE = 32
PATCH = 16


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two nucleus and two membrane pairs from fmc.simulate (ids 0-1 per channel)."""
    from fmc.simulate import write_dataset

    folder = tmp_path_factory.mktemp("sim")
    write_dataset(folder, 2, "nucleus", seed=11, shape=SIM_SHAPE)
    write_dataset(folder, 2, "membrane", seed=12, shape=SIM_SHAPE)
    return folder


@pytest.fixture(scope="session")
def sim_cache(sim_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fmc.training.cache import PrepareConfig, prepare_cache

    cache = tmp_path_factory.mktemp("cache")
    prepare_cache(
        PrepareConfig(data=sim_data, cache=cache, device="cpu", global_size=GLOBAL_SIZE, progress=False)
    )
    return cache


def tiny_fit_args(run: Path, cache: Path, *extra: str) -> list[str]:
    """`train.py fit` flags for a seconds-long CPU run of the full method (GAN + DW) on the tiny cache."""
    return [
        "fit",
        "--run-dir", str(run),
        "--cache", str(cache),
        "--preset", "tiny",
        "--ablation", "adversarial-dw",
        "--global-size", str(GLOBAL_SIZE),
        "--patch", str(PATCH),
        "--batch", "2",
        "--patches-per-case", "2",
        "--max-steps", "2",
        "--gan-warmup-steps", "1",
        "--disc-base", "4",
        "--disc-levels", "2",
        "--num-workers", "0",
        "--accelerator", "cpu",
        "--val-fraction", "0.5",
        "--val-max-cases", "1",
        "--val-overlap", "0",
        "--preview-cases", "1",
        "--log-every-n-steps", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def split_csv(sim_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image 0 (both channels) trains, image 1 validates, whatever studies the simulator drew."""
    from fmc.data.split import SplitRow, write_split
    from fmc.training.cache import load_manifest

    rows = [
        SplitRow(c.id, c.image_id, c.channel, c.study, "val" if c.image_id == 1 else "train")
        for c in load_manifest(sim_cache).cases
    ]
    path = tmp_path_factory.mktemp("split") / "split.csv"
    write_split(path, rows)
    return path


@pytest.fixture(scope="session")
def fit_run(sim_cache: Path, split_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fmc.training.cli import main

    run = tmp_path_factory.mktemp("run")
    assert main(tiny_fit_args(run, sim_cache, "--split-csv", str(split_csv))) == 0
    return run
