"""Fit the output's trust settings on validation pairs and store them in the model cards.

Why: the networks' change and the input's own sub-0.6 um detail are both worth having only where
they are right. The safeguard (:mod:`fmc.change_gate`) adds ``change_strength`` of the networks'
change to a case, or ``close_change_strength`` when the case's closeness reaches
``closeness_threshold``; ``detail_noise_weight`` (how fast the kept share of the input's fine
detail falls with its noise, :mod:`fmc.native_detail`) and ``detail_sigma`` (the in-plane
smoothing of the native input before that) weigh the native detail. All five are chosen together
on a grid, on validation pairs of every regime given: the choice with the best mean over the
(channel, family) groups among those that make no case worse than ``WORST_ALLOWED``; when none
qualifies, the one whose worst case is highest. The networks run once per case
(:meth:`FusionPipeline.run_each_setting`), and each case's score under a gated choice is read
from its score at the strength the gate gives it.

``python -m fmc.training.safeguard_fit --weights DIR --data calibrated=DIR harsh=DIR --min-id 1000``
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fmc.change_gate import GATE_OFF, gated_strength
from fmc.cli_help import DefaultsHelpFormatter
from fmc.data.pairs import find_pairs, reconcile
from fmc.io import read_case
from fmc.metrics import normalized_gain, ssim_against
from fmc.pipeline import FusionPipeline
from fmc.training.evaluate import pipeline_config_for
from fmc.weights import ModelCard, discover_models, update_cards

log = logging.getLogger(__name__)

#: A case scored below this N_SSIM counts as made worse than its input.
WORST_ALLOWED = -0.02
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
THRESHOLDS = (0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, GATE_OFF)
NOISE_WEIGHTS = (1.0,)
SIGMAS = (0.8, 1.1)  # voxels
FIT_KEY = "safeguard_fit"


class Choice(NamedTuple):
    """One point of the grid: the settings it writes into the cards."""

    change_strength: float
    close_change_strength: float
    closeness_threshold: float
    detail_noise_weight: float
    detail_sigma: float

    def strength(self, closeness: float) -> float:
        """The strength a case of this closeness gets: the gate's own rule."""
        return gated_strength(
            self.change_strength, self.close_change_strength, self.closeness_threshold, closeness
        )


def grid() -> list[Choice]:
    """Every choice; with the gate off only one close strength (it is never used)."""
    choices = []
    for far, close, threshold, weight, sigma in itertools.product(
        STRENGTHS, STRENGTHS, THRESHOLDS, NOISE_WEIGHTS, SIGMAS
    ):
        if threshold >= GATE_OFF and close != far:
            continue
        if threshold < GATE_OFF and close >= far:
            continue  # a close case never gets more than a far one
        choices.append(Choice(far, close, threshold, weight, sigma))
    return choices


def score_cases(
    weights: Path, folders: list[tuple[str, Path]], min_id: int, device: torch.device
) -> list[dict]:
    """Per validation case (ids >= ``min_id``): its closeness and its N_SSIM at every strength,
    noise weight and sigma of the grid, keyed ``(strength, noise_weight, sigma)``."""
    keys = list(itertools.product(STRENGTHS, NOISE_WEIGHTS, SIGMAS))
    rows: list[dict] = []
    pipelines: dict[str, FusionPipeline] = {}
    for family, folder in folders:
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
                    closeness_threshold=GATE_OFF,
                    native_detail=1.0,
                    detail_noise_weight=w,
                    detail_sigma=g,
                )
                for s, w, g in keys
            ]
            outputs = pipeline.run_each_setting(angle.volume, spacing, variants)
            ssim_in = ssim_against(angle.volume, fused.volume)  # N_SSIM's reference, once per case
            scores = {
                k: normalized_gain(ssim_against(o, fused.volume), ssim_in)
                for k, o in zip(keys, outputs, strict=True)
            }
            closeness = pipeline.closeness_by_dw[pipeline.settings.difference_weighting]
            rows.append(
                {
                    "family": family,
                    "case": pair.case_id,
                    "channel": pair.channel,
                    "closeness": closeness,
                    "scores": scores,
                }
            )
            log.info(
                "%s %s (%.1f s): closeness %.3f, best %s",
                family,
                pair.case_id,
                time.perf_counter() - start,
                closeness,
                max(scores, key=scores.__getitem__),
            )
    return rows


def case_score(row: dict, choice: Choice) -> float:
    """The case's N_SSIM under ``choice``."""
    key = (choice.strength(row["closeness"]), choice.detail_noise_weight, choice.detail_sigma)
    return row["scores"][key]


def group_means(rows: list[dict], choice: Choice) -> dict[str, float]:
    """Mean N_SSIM per "channel family" group under ``choice``."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(f"{row['channel']} {row['family']}", []).append(case_score(row, choice))
    return {name: float(np.mean(values)) for name, values in sorted(groups.items())}


def mean_of_groups(rows: list[dict], choice: Choice) -> float:
    """The fit's objective: the mean of the group means."""
    return float(np.mean(list(group_means(rows, choice).values())))


def worst_case(rows: list[dict], choice: Choice) -> float:
    """The lowest N_SSIM of any case under ``choice``."""
    return min(case_score(row, choice) for row in rows)


def choose(rows: list[dict], choices: list[Choice]) -> Choice:
    """The best mean over groups among the choices that keep every case above WORST_ALLOWED."""
    if not rows:
        raise ValueError("no validation cases to fit on")
    safe = [c for c in choices if worst_case(rows, c) >= WORST_ALLOWED]
    if safe:
        return max(safe, key=lambda c: mean_of_groups(rows, c))
    return max(choices, key=lambda c: worst_case(rows, c))


def store(weights: Path, choice: Choice, rows: list[dict], fitted_on: dict) -> list[Path]:
    """Write the choice into every card's ``training.pipeline`` (both steps agree) with its record."""
    settings = choice._asdict()
    record = {
        "rule": f"best mean over groups with no case below {WORST_ALLOWED}",
        **settings,
        "group_means": group_means(rows, choice),
        "worst_case": worst_case(rows, choice),
        "fitted_on": fitted_on,
    }

    def edit(card: ModelCard) -> None:
        card.training.setdefault("pipeline", {}).update(native_detail=1.0, **settings)
        card.training[FIT_KEY] = record

    return update_cards(weights, edit)


def describe(choice: Choice) -> str:
    """One phrase for a choice."""
    gate = (
        "no gate"
        if choice.closeness_threshold >= GATE_OFF
        else f"close (>= {choice.closeness_threshold:.3f}) {choice.close_change_strength:.2f}"
    )
    return (
        f"strength {choice.change_strength:.2f}, {gate}, noise weight {choice.detail_noise_weight:.2f}, "
        f"sigma {choice.detail_sigma:.1f}"
    )


def _family_folder(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected FAMILY=FOLDER, got {text!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    """CLI: score the grid on validation pairs, print the best choices, store the winner in the cards."""
    parser = argparse.ArgumentParser(
        prog="python -m fmc.training.safeguard_fit",
        description="Choose the safeguard (change_strength, close_change_strength, closeness_threshold) "
        "and the native-detail weights on validation pairs (never on reported test pairs) and store "
        "them in the model cards under --weights.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, required=True, help="model folder whose cards get the choice")
    parser.add_argument(
        "--data",
        type=_family_folder,
        nargs="+",
        required=True,
        metavar="FAMILY=FOLDER",
        help="validation pairs by family (e.g. calibrated=DIR harsh=DIR; a family may name several folders)",
    )
    parser.add_argument("--min-id", type=int, default=0, help="only image ids >= this (validation ids)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, store nothing")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    folders = list(args.data)
    rows = score_cases(args.weights, folders, args.min_id, torch.device("cpu"))
    choices = grid()
    ranked = sorted(choices, key=lambda c: (worst_case(rows, c) >= WORST_ALLOWED, mean_of_groups(rows, c)))
    for choice in ranked[-12:]:
        means = " ".join(f"{k}={v:+.3f}" for k, v in group_means(rows, choice).items())
        print(f"{describe(choice)}: {means} worst {worst_case(rows, choice):+.3f}")
    choice = choose(rows, choices)
    print(f"chosen: {describe(choice)} ({len(rows)} cases, {len(choices)} choices)")
    if not args.dry_run:
        fitted_on = {
            "data": [f"{family}={folder}" for family, folder in folders],
            "min_id": args.min_id,
            "cases": len(rows),
        }
        for path in store(args.weights, choice, rows, fitted_on):
            print(f"stored in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
