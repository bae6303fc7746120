"""The simple baselines every quality figure stands beside; a model counts only if it beats the strongest.

* ``identity`` -- the input itself (N_SSIM 0 by definition);
* ``gaussian`` -- the public peer: sigma 0.442 (nucleus) / 0.5 (membrane) voxels;
* ``gaussian-tuned`` -- one sigma per channel, fitted by :func:`fit_sigma` on training pairs and
  stored in the model card next to the weights it is compared with;
* ``resample`` -- the pipeline's own resampling: to 0.6 um isotropic and back, nothing else. It is
  what the pipeline gives with networks that change nothing, and resampling alone already smooths
  (a factor 3 down in y and x for 0.195 um data), so it is a strong baseline.

``python -m fmc.baselines --data DIR --weights DIR`` fits the tuned sigma and writes it to the cards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from fmc.method import TARGET_SPACING_UM
from fmc.metrics import gaussian_baseline, n_ssim

log = logging.getLogger(__name__)

BASELINES = ("identity", "gaussian", "gaussian-tuned", "resample")
#: Where a card keeps the tuned sigma: ``card.training[BASELINE_KEY]["gaussian_tuned_sigma"][channel]``.
BASELINE_KEY = "baselines"
SIGMA_RANGE = (0.2, 4.0)  # voxels; golden-section search bounds


def resample_baseline(
    volume: np.ndarray,
    spacing: Sequence[float],
    device: torch.device | str = "cpu",
    target_spacing: float = TARGET_SPACING_UM,
) -> np.ndarray:
    """To ``target_spacing`` isotropic and back with the pipeline's own steps; uint16 like its output."""
    from fmc.pipeline import round_trip_uint16, to_isotropic

    with torch.inference_mode():
        iso, bounds = to_isotropic(
            volume, tuple(float(s) for s in spacing), torch.device(device), target_spacing
        )
        return round_trip_uint16(iso, tuple(volume.shape), bounds)


def gaussian_tuned(volume: np.ndarray, sigma: float) -> np.ndarray:
    """The input blurred by one isotropic Gaussian of ``sigma`` voxels (float32)."""
    return ndimage.gaussian_filter(
        np.asarray(volume, dtype=np.float32), sigma=float(sigma), output=np.float32
    )


def baseline_prediction(
    name: str,
    volume: np.ndarray,
    channel: str,
    spacing: Sequence[float],
    sigma: float | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """One baseline's prediction for one case."""
    if name == "identity":
        return volume
    if name == "gaussian":
        return gaussian_baseline(volume, channel)
    if name == "gaussian-tuned":
        if sigma is None:
            raise ValueError(f"the gaussian-tuned baseline needs a fitted sigma for the {channel} channel")
        return gaussian_tuned(volume, sigma)
    if name == "resample":
        return resample_baseline(volume, spacing, device)
    raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")


def fit_sigma(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    bounds: tuple[float, float] = SIGMA_RANGE,
    tolerance: float = 0.01,
) -> tuple[float, float]:
    """The sigma (voxels) that maximizes the mean N_SSIM of the blurred inputs over ``(input, target)``
    pairs, by golden-section search (the score is unimodal in sigma in practice); returns (sigma, score)."""
    if not pairs:
        raise ValueError("fit_sigma needs at least one (input, target) pair")

    cache: dict[float, float] = {}

    def score(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = float(
                np.mean([n_ssim(gaussian_tuned(i, sigma), t, i, device="scipy") for i, t in pairs])
            )
            log.debug("sigma %.4f: mean N_SSIM %.4f", sigma, cache[sigma])
        return cache[sigma]

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = bounds
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    while b - a > tolerance:
        if score(c) >= score(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    best = max(cache, key=cache.__getitem__)
    return best, cache[best]


# ------------------------------------------------------------------------------------ the cards


def store_sigmas(weights: Path, sigmas: dict[str, float], fitted_on: dict) -> list[Path]:
    """Write the tuned sigmas into every model card under ``weights``; returns the cards changed."""
    from fmc.weights import update_cards

    def edit(card: Any) -> None:
        card.training[BASELINE_KEY] = {"gaussian_tuned_sigma": dict(sigmas), "fitted_on": fitted_on}

    return update_cards(weights, edit)


def stored_sigma(training: dict, channel: str) -> float | None:
    """The tuned sigma a card's ``training`` record holds for ``channel`` (None when it holds none)."""
    value = training.get(BASELINE_KEY, {}).get("gaussian_tuned_sigma", {}).get(channel)
    return None if value is None else float(value)


def sigma_of_models(models: Iterable[Any], channel: str) -> float | None:
    """The tuned sigma stored with the first of these loaded models (fmc.weights.LoadedModel or None)
    whose card holds one for ``channel``."""
    for loaded in models:
        if loaded is not None:
            sigma = stored_sigma(loaded.card.training, channel)
            if sigma is not None:
                return sigma
    return None


def main(argv: list[str] | None = None) -> int:
    """CLI: fit the tuned sigma per channel on a folder of pairs and store it in the model cards."""
    from fmc.data.pairs import find_pairs
    from fmc.data.split import read_split
    from fmc.io import read_case

    parser = argparse.ArgumentParser(
        prog="python -m fmc.baselines",
        description="Fit the gaussian-tuned baseline: one sigma per channel (voxels) that maximizes mean "
        "N_SSIM on training pairs, and store it in the model cards under --weights.",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of image_{N}_{channel}_{angle|fused}.tif"
    )
    parser.add_argument("--weights", type=Path, default=None, help="model folder whose cards get the sigmas")
    parser.add_argument(
        "--split-csv", type=Path, default=None, help="a run's split.csv: fit on its train subset"
    )
    parser.add_argument("--max-cases", type=int, default=16, help="pairs per channel to fit on (default 16)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    pairs = find_pairs(args.data).pairs
    if args.split_csv is not None:
        train = {r.case_id for r in read_split(args.split_csv) if r.subset == "train"}
        pairs = [p for p in pairs if p.case_id in train]
    sigmas: dict[str, float] = {}
    counts: dict[str, int] = {}
    for channel in ("nucleus", "membrane"):
        chosen = [p for p in pairs if p.channel == channel][: args.max_cases]
        if not chosen:
            continue
        volumes = [(read_case(p.angle).volume, read_case(p.fused).volume) for p in chosen]
        sigma, score = fit_sigma(volumes)
        sigmas[channel], counts[channel] = round(sigma, 4), len(chosen)
        print(f"{channel}: sigma {sigma:.4f} voxels, mean N_SSIM {score:+.4f} on {len(chosen)} pairs")
    if not sigmas:
        print(f"no pairs in {args.data}", file=sys.stderr)
        return 1
    if args.weights is not None:
        fitted_on = {
            "data": str(args.data),
            "split": str(args.split_csv) if args.split_csv else None,
            "pairs": counts,
        }
        for path in store_sigmas(args.weights, sigmas, fitted_on):
            print(f"stored in {path}")
    print(json.dumps(sigmas))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
