"""Fit the output's trust settings on validation pairs and store them in the model cards.

Why: the networks' change and the input's own sub-0.6 um detail are both worth having only where
they are right. ``change_strength`` (the safeguard: how much of the networks' change is added),
``detail_noise_weight`` (how fast the kept share of the input's fine detail falls with its
noise, :mod:`fmc.native_detail`) and ``detail_sigma`` (the in-plane smoothing of the native
input before that) are chosen together on a grid, on validation pairs of every
regime given: the choice with the best mean over the (channel, family) groups among those that
make no case worse than ``WORST_ALLOWED``; when none qualifies, the one whose worst case is
highest. The networks run once per case (:meth:`FusionPipeline.run_each_setting`).

``python -m fmc.training.safeguard_fit --weights DIR --data calibrated=DIR harsh=DIR --min-id 1000``
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fmc.cli_help import DefaultsHelpFormatter
from fmc.io import read_case
from fmc.metrics import n_ssim
from fmc.pipeline import FusionPipeline
from fmc.training.evaluate import pipeline_config_for
from fmc.training.pairs import find_pairs, reconcile
from fmc.weights import ModelCard, discover_models, update_cards

log = logging.getLogger(__name__)

#: A case scored below this N_SSIM counts as made worse than its input.
WORST_ALLOWED = -0.02
STRENGTHS = (0.25, 0.5, 1.0)
NOISE_WEIGHTS = (0.0, 1.0, 1.5)
SIGMAS = (0.0, 0.5, 0.8)  # voxels
FIT_KEY = "safeguard_fit"

Choice = tuple[float, float, float]  # (change_strength, detail_noise_weight, detail_sigma)


def score_grid(
    weights: Path, folders: dict[str, Path], min_id: int, device: torch.device
) -> tuple[list[dict], list[Choice]]:
    """N_SSIM of every validation case (ids >= ``min_id``) under every grid choice."""
    grid = [(s, w, g) for s in STRENGTHS for w in NOISE_WEIGHTS for g in SIGMAS]
    rows: list[dict] = []
    pipelines: dict[str, FusionPipeline] = {}
    for family, folder in folders.items():
        for pair in find_pairs(folder).pairs:
            if pair.image_id < min_id:
                continue
            start = time.perf_counter()
            angle, fused = read_case(pair.angle), read_case(pair.fused)
            spacing = reconcile(pair, angle.meta, fused.meta).spacing
            if pair.channel not in pipelines:
                models = discover_models(weights, pair.channel, None, device=device)
                config = pipeline_config_for(models, 0.5, 2, False, device)
                pipelines[pair.channel] = FusionPipeline(models, config, device)
            pipeline = pipelines[pair.channel]
            variants = [
                dataclasses.replace(
                    pipeline.settings,
                    change_strength=s,
                    native_detail=1.0,
                    detail_noise_weight=w,
                    detail_sigma=g,
                )
                for s, w, g in grid
            ]
            outputs = pipeline.run_each_setting(angle.volume, spacing, variants)
            scores = {c: n_ssim(o, fused.volume, angle.volume) for c, o in zip(grid, outputs, strict=True)}
            rows.append({"family": family, "case": pair.case_id, "channel": pair.channel, "scores": scores})
            log.info(
                "%s %s (%.1f s): best %s",
                family,
                pair.case_id,
                time.perf_counter() - start,
                max(scores, key=scores.__getitem__),
            )
    return rows, grid


def group_means(rows: list[dict], choice: Choice) -> dict[str, float]:
    """Mean N_SSIM per "channel family" group under ``choice``."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(f"{row['channel']} {row['family']}", []).append(row["scores"][choice])
    return {name: float(np.mean(values)) for name, values in sorted(groups.items())}


def worst_case(rows: list[dict], choice: Choice) -> float:
    """The lowest N_SSIM of any case under ``choice``."""
    return min(row["scores"][choice] for row in rows)


def choose(rows: list[dict], grid: list[Choice]) -> Choice:
    """The best mean over groups among the choices that keep every case above WORST_ALLOWED."""
    if not rows:
        raise ValueError("no validation cases to fit on")

    def mean(choice: Choice) -> float:
        return float(np.mean(list(group_means(rows, choice).values())))

    safe = [c for c in grid if worst_case(rows, c) >= WORST_ALLOWED]
    return max(safe, key=mean) if safe else max(grid, key=lambda c: worst_case(rows, c))


def store(weights: Path, choice: Choice, rows: list[dict], fitted_on: dict) -> list[Path]:
    """Write the choice into every card's ``training.pipeline`` (both steps agree) with its record."""
    strength, noise_weight, sigma = choice
    record = {
        "rule": f"best mean over groups with no case below {WORST_ALLOWED}",
        "change_strength": strength,
        "detail_noise_weight": noise_weight,
        "detail_sigma": sigma,
        "group_means": group_means(rows, choice),
        "worst_case": worst_case(rows, choice),
        "fitted_on": fitted_on,
    }

    def edit(card: ModelCard) -> None:
        card.training.setdefault("pipeline", {}).update(
            native_detail=1.0, detail_noise_weight=noise_weight, detail_sigma=sigma, change_strength=strength
        )
        card.training[FIT_KEY] = record

    return update_cards(weights, edit)


def _family_folder(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected FAMILY=FOLDER, got {text!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    """CLI: score the grid on validation pairs, print it, store the choice in the cards."""
    parser = argparse.ArgumentParser(
        prog="python -m fmc.training.safeguard_fit",
        description="Choose change_strength and detail_noise_weight on validation pairs (never on "
        "reported test pairs) and store them in the model cards under --weights.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, required=True, help="model folder whose cards get the choice")
    parser.add_argument(
        "--data",
        type=_family_folder,
        nargs="+",
        required=True,
        metavar="FAMILY=FOLDER",
        help="validation pairs, one folder per family (e.g. calibrated=DIR harsh=DIR)",
    )
    parser.add_argument("--min-id", type=int, default=0, help="only image ids >= this (validation ids)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, store nothing")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    folders = dict(args.data)
    rows, grid = score_grid(args.weights, folders, args.min_id, torch.device("cpu"))
    for choice in grid:
        means = " ".join(f"{k}={v:+.3f}" for k, v in group_means(rows, choice).items())
        worst = worst_case(rows, choice)
        print(
            f"strength {choice[0]:.2f} noise weight {choice[1]:.2f} sigma {choice[2]:.1f}: "
            f"{means} worst {worst:+.3f}"
        )
    choice = choose(rows, grid)
    print(
        f"chosen: change_strength {choice[0]}, detail_noise_weight {choice[1]}, detail_sigma {choice[2]} "
        f"({len(rows)} cases)"
    )
    if not args.dry_run:
        fitted_on = {
            "data": {k: str(v) for k, v in folders.items()},
            "min_id": args.min_id,
            "cases": len(rows),
        }
        for path in store(args.weights, choice, rows, fitted_on):
            print(f"stored in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
