"""Where a fit run's cache comes from: an existing cache, a raw data folder, or fmc.simulate.

Runs on one process per node (Lightning's ``prepare_data``); everything is resumable, so
calling it again after an interruption only does what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fmc.training.cache import Manifest, PrepareConfig, load_manifest, prepare_cache
from fmc.training.config import DataConfig, FitConfig

log = logging.getLogger(__name__)

SIM_MARKER = "simulated.json"


def simulated_folder(data: DataConfig) -> Path:
    return Path(data.run_dir) / "simulated"


def simulation_description(data: DataConfig) -> dict[str, Any]:
    """What was simulated; also the marker that says the folder is complete."""
    return {
        "generator": "fmc.simulate.write_dataset (domain randomization: fmc.simulate.random_params)",
        "pairs_per_channel": data.simulate,
        "channels": list(data.sim_channels),
        "shape": list(data.sim_shape),
        "seed": data.sim_seed,
    }


def ensure_simulated(data: DataConfig) -> Path:
    """Write ``--simulate`` pairs per channel once (seed ``sim_seed + k`` for the k-th channel)."""
    from fmc.simulate import write_dataset

    folder = simulated_folder(data)
    marker = folder / SIM_MARKER
    wanted = simulation_description(data)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log.info("simulated data already in %s", folder)
        return folder
    for k, channel in enumerate(data.sim_channels):
        log.info(
            "simulating %d %s pair(s) of shape %s into %s", data.simulate, channel, data.sim_shape, folder
        )
        write_dataset(folder, data.simulate, channel, data.sim_seed + k, tuple(data.sim_shape))
    marker.write_text(json.dumps(wanted, indent=2))
    return folder


def ensure_cache(config: FitConfig, *, workers: int = 1, device: str = "auto") -> Path:
    """Simulate and/or prepare as the config asks; returns the cache folder (which has a manifest)."""
    cache = config.data.cache_dir()
    data = Path(config.data.raw_folder) if config.data.raw_folder else None
    if config.data.simulate > 0:
        data = ensure_simulated(config.data)
    if data is not None:
        prepare_cache(
            PrepareConfig(
                data=data,
                cache=cache,
                workers=workers,
                device=device,
                global_size=config.method.global_size,
                progress=True,
            )
        )
    load_matching_manifest(config)
    return cache


def load_matching_manifest(config: FitConfig) -> Manifest:
    """The cache's manifest, refused when its global volumes are not ``--global-size`` cubes."""
    cache = config.data.cache_dir()
    manifest = load_manifest(cache)
    wanted = config.method.global_size
    if manifest.global_size != wanted:
        raise ValueError(
            f"the cache {cache} holds {manifest.global_size}^3 global volumes but --global-size is "
            f"{wanted}: prepare again with --global-size {wanted} or change the flag"
        )
    return manifest


def data_description(data: DataConfig) -> dict[str, Any]:
    """For the model card: what the model was trained on."""
    manifest = load_manifest(data.cache_dir())
    channels = sorted({c.channel for c in manifest.cases})
    studies = sorted({str(c.study) if c.study is not None else "none" for c in manifest.cases})
    description: dict[str, Any] = {
        "source": manifest.data,
        "cases": len(manifest.cases),
        "channels": channels,
        "studies": studies,
        "failed_cases": len(manifest.failed),
        "cache_settings": manifest.settings,
    }
    simulated_folder_given = any(Path(manifest.data).glob("image_*_params.json"))  # fmc.simulate's sidecars
    if data.simulate > 0 or simulated_folder_given:
        description["simulated"] = simulation_description(data) if data.simulate > 0 else True
        description["note"] = (
            "trained on simulated data from fmc.simulate; retrain on the FuseMyCells data for real use"
        )
    return description
