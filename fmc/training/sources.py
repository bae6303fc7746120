"""Where a fit run's cache comes from: an existing cache, a raw data folder, or fmc.simulate.

Runs on one process per node (Lightning's ``prepare_data``); everything is resumable, so
calling it again after an interruption only does what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fmc.training.cache import PrepareConfig, load_manifest, prepare_cache
from fmc.training.config import FitConfig

log = logging.getLogger(__name__)

SIM_MARKER = "simulated.json"


def simulated_folder(config: FitConfig) -> Path:
    return Path(config.run_dir) / "simulated"


def simulation_description(config: FitConfig) -> dict[str, Any]:
    """What was simulated; also the marker that says the folder is complete."""
    return {
        "generator": "fmc.simulate.write_dataset (domain randomization: fmc.simulate.random_params)",
        "pairs_per_channel": config.simulate,
        "channels": list(config.sim_channels),
        "shape": list(config.sim_shape),
        "seed": config.sim_seed,
    }


def ensure_simulated(config: FitConfig) -> Path:
    """Write ``config.simulate`` pairs per channel once (seed ``sim_seed + k`` for the k-th channel)."""
    from fmc.simulate import write_dataset

    folder = simulated_folder(config)
    marker = folder / SIM_MARKER
    wanted = simulation_description(config)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log.info("simulated data already in %s", folder)
        return folder
    for k, channel in enumerate(config.sim_channels):
        log.info(
            "simulating %d %s pair(s) of shape %s into %s", config.simulate, channel, config.sim_shape, folder
        )
        write_dataset(folder, config.simulate, channel, config.sim_seed + k, tuple(config.sim_shape))
    marker.write_text(json.dumps(wanted, indent=2))
    return folder


def ensure_cache(config: FitConfig, *, workers: int = 1, device: str = "auto") -> Path:
    """Simulate and/or prepare as the config asks; returns the cache folder (which has a manifest)."""
    cache = config.cache_dir()
    data = Path(config.data) if config.data else None
    if config.simulate > 0:
        data = ensure_simulated(config)
    if data is not None:
        prepare_cache(
            PrepareConfig(
                data=data,
                cache=cache,
                workers=workers,
                device=device,
                global_size=config.global_size,
                progress=True,
            )
        )
    manifest = load_manifest(cache)
    if manifest.global_size != config.global_size:
        raise ValueError(
            f"the cache {cache} holds {manifest.global_size}^3 global volumes but --global-size is "
            f"{config.global_size}: prepare again with --global-size {config.global_size} or change the flag"
        )
    return cache


def data_description(config: FitConfig) -> dict[str, Any]:
    """For the model card: what the model was trained on."""
    manifest = load_manifest(config.cache_dir())
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
    if config.simulate > 0 or simulated_folder_given:
        description["simulated"] = simulation_description(config) if config.simulate > 0 else True
        description["note"] = (
            "trained on simulated data from fmc.simulate; retrain on the FuseMyCells data for real use"
        )
    return description
