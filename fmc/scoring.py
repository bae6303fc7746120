"""``python -m fmc.scoring``: score predictions (or a baseline) against fused ground truth.

Pairs files by name: a prediction has the input's file name; the ground truth is the input's
name with ``_angle`` replaced by ``_fused``. Prints a per-case table (SSIM of input and
prediction, N_SSIM, proxy N_IoU) and per-channel means (the challenge ranks nucleus and
membrane apart), and can write a CSV. The IoU term uses Otsu masks, not the challenge's
Cellpose models, so it is always labelled "proxy". SSIM/N_SSIM definitions: :mod:`fmc.metrics`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmc.baselines import BASELINES, baseline_prediction
from fmc.io import CaseError, list_cases, read_case
from fmc.metrics import iou_proxy_scores, ssim_scores

log = logging.getLogger(__name__)
#: CSV columns, in order; one row per scored case.
COLUMNS = (
    "case",
    "channel",
    "study",
    "ssim_input",
    "ssim_pred",
    "n_ssim",
    "iou_input_proxy",
    "iou_pred_proxy",
    "n_iou_proxy",
    "seconds",
)
#: Columns averaged per channel.
MEAN_COLUMNS = ("ssim_input", "ssim_pred", "n_ssim", "iou_input_proxy", "iou_pred_proxy", "n_iou_proxy")


def ground_truth_name(input_name: str) -> str:
    """``image_3_nucleus_angle.tif`` -> ``image_3_nucleus_fused.tif``; names without ``_angle`` are kept."""
    return input_name.replace("_angle", "_fused")


def _metric_device(device: object) -> object:
    """CLI vocabulary -> fmc.metrics device: 'cpu' picks the scipy back end (faster on CPU than torch)."""
    if device in (None, "auto"):
        return None
    if device == "cpu":
        return "scipy"
    return device


@dataclass
class FolderEvaluation:
    """Scored rows (keys :data:`COLUMNS`) and one ``"name: reason"`` line per input that was not scored."""

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _score_case(
    input_path: Path,
    gt_dir: Path,
    pred_dir: Path | None,
    baseline: str | None,
    device: object,
    sigmas: dict[str, float] | None = None,
) -> dict:
    """Score one input file; raises CaseError (with the file's name) when it cannot be scored."""
    start = time.perf_counter()
    gt_path = gt_dir / ground_truth_name(input_path.name)
    if not gt_path.is_file():
        raise CaseError(input_path, f"no ground truth {gt_path.name} in {gt_dir}")
    inp = read_case(input_path)
    gt = read_case(gt_path)
    channel = inp.meta.channel if inp.meta.channel != "unknown" else gt.meta.channel
    if baseline is not None:
        sigma = (sigmas or {}).get(channel)
        if baseline == "gaussian-tuned" and sigma is None:
            raise CaseError(
                input_path, f"no tuned sigma for the {channel} channel: give --sigma or --weights"
            )
        pred_volume = baseline_prediction(baseline, inp.volume, channel, inp.meta.spacing, sigma)
    else:
        assert pred_dir is not None
        pred_path = pred_dir / input_path.name
        if not pred_path.is_file():
            raise CaseError(input_path, f"no prediction {pred_path.name} in {pred_dir}")
        pred_volume = read_case(pred_path).volume
    shapes = {"input": inp.volume.shape, "ground truth": gt.volume.shape, "prediction": pred_volume.shape}
    if len(set(shapes.values())) != 1:
        raise CaseError(input_path, "shape mismatch: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    read_s = time.perf_counter() - start

    try:
        t0 = time.perf_counter()
        ssim = ssim_scores(pred_volume, gt.volume, inp.volume, device=_metric_device(device))
        t1 = time.perf_counter()
        iou = iou_proxy_scores(pred_volume, gt.volume, inp.volume)
        t2 = time.perf_counter()
    except ValueError as exc:  # e.g. an axis shorter than the 11-voxel SSIM window
        raise CaseError(input_path, str(exc)) from exc
    log.info(
        "%s: read %.2f s, SSIM %.2f s, proxy IoU %.2f s, N_SSIM %.4f",
        input_path.name,
        read_s,
        t1 - t0,
        t2 - t1,
        ssim.n_ssim,
    )
    study = inp.meta.study if inp.meta.study is not None else gt.meta.study
    return {
        "case": input_path.name,
        "channel": channel,
        "study": "" if study is None else study,
        "ssim_input": ssim.ssim_input,
        "ssim_pred": ssim.ssim_pred,
        "n_ssim": ssim.n_ssim,
        "iou_input_proxy": iou.iou_input_proxy,
        "iou_pred_proxy": iou.iou_pred_proxy,
        "n_iou_proxy": iou.n_iou_proxy,
        "seconds": time.perf_counter() - start,
    }


def run_evaluation(
    input_dir: Path | str,
    gt_dir: Path | str,
    pred_dir: Path | str | None = None,
    baseline: str | None = None,
    device: object = None,
    sigmas: dict[str, float] | None = None,
) -> FolderEvaluation:
    """Score every input in ``input_dir``; unscorable cases are listed in ``problems``, never fatal.

    ``baseline`` (one of :data:`fmc.baselines.BASELINES`) scores that baseline instead of
    ``pred_dir``; ``sigmas`` (per channel, voxels) are the gaussian-tuned baseline's.
    ``device``: None/"auto" (CUDA if available, else scipy), "cpu" (scipy), "cuda", or a torch device.
    """
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if baseline is None and pred_dir is None:
        raise ValueError("give a prediction folder or a baseline")
    if baseline is not None and pred_dir is not None:
        log.warning("scoring the %s baseline; predictions in %s are ignored", baseline, pred_dir)
        pred_dir = None
    input_dir, gt_dir = Path(input_dir), Path(gt_dir)
    pred_dir = Path(pred_dir) if pred_dir is not None else None
    result = FolderEvaluation()
    inputs = list_cases(input_dir) if input_dir.is_dir() else []
    # A folder of training pairs holds the targets too: a *_fused file is ground truth, never an input.
    inputs = [p for p in inputs if "_fused" not in p.name]
    if not inputs:
        result.problems.append(f"{input_dir}: no .tif/.tiff files to score")
        return result
    start = time.perf_counter()
    for path in inputs:
        try:
            result.rows.append(_score_case(path, gt_dir, pred_dir, baseline, device, sigmas))
        except CaseError as exc:
            log.error("not scored: %s", exc)
            result.problems.append(str(exc))
    log.info("scored %d of %d cases in %.1f s", len(result.rows), len(inputs), time.perf_counter() - start)
    return result


def evaluate_folder(
    input_dir: Path | str,
    gt_dir: Path | str,
    pred_dir: Path | str | None = None,
    baseline: str | None = None,
    device: object = None,
) -> list[dict]:
    """Rows of :func:`run_evaluation` (one dict per scored case, keys :data:`COLUMNS`), for training code."""
    return run_evaluation(input_dir, gt_dir, pred_dir, baseline, device).rows


def channel_means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per-channel means of :data:`MEAN_COLUMNS` (NaN scores skipped) plus ``n``, the case count."""
    out: dict[str, dict[str, float]] = {}
    for channel in sorted({r["channel"] for r in rows}):
        group = [r for r in rows if r["channel"] == channel]
        means: dict[str, float] = {"n": float(len(group))}
        for col in MEAN_COLUMNS:
            values = np.array([r[col] for r in group], dtype=np.float64)
            finite = values[np.isfinite(values)]
            means[col] = float(finite.mean()) if finite.size else math.nan
        out[channel] = means
    return out


def format_table(rows: list[dict], means: dict[str, dict[str, float]]) -> str:
    """Per-case table, then per-channel means (N_IoU is marked as the Otsu proxy)."""
    headers = ("case", "channel", "SSIM input", "SSIM pred", "N_SSIM", "N_IoU (proxy)")
    keys = ("ssim_input", "ssim_pred", "n_ssim", "n_iou_proxy")
    body = [(r["case"], r["channel"], *(f"{r[k]:.4f}" for k in keys)) for r in rows]
    body += [
        (f"mean (n={int(m['n'])})", channel, *(f"{m[k]:.4f}" for k in keys)) for channel, m in means.items()
    ]
    widths = [max(len(str(x[i])) for x in [headers, *body]) for i in range(len(headers))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for i, row in enumerate(body):
        if i == len(rows):
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    lines.append("N_IoU (proxy): Otsu masks, not the challenge's Cellpose segmentations.")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per scored case, full float precision, columns :data:`COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmc.scoring",
        description=(
            "Score predicted fused volumes against ground truth: SSIM, N_SSIM and a proxy N_IoU (Otsu "
            "masks instead of Cellpose) per case and per channel. Ground truth for <name>_angle.tif is "
            "<name>_fused.tif; a prediction has the input's file name."
        ),
    )
    parser.add_argument(
        "--input", type=Path, required=True, help="folder of single-view input TIFFs (*_angle.tif)"
    )
    parser.add_argument(
        "--pred",
        type=Path,
        default=None,
        help="folder of predictions named like the inputs (not needed with --baseline)",
    )
    parser.add_argument(
        "--gt", type=Path, required=True, help="folder of fused ground-truth TIFFs (*_fused.tif)"
    )
    parser.add_argument(
        "--csv", type=Path, default=None, help="also write the per-case scores to this CSV file"
    )
    parser.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        help="score a baseline instead of --pred: identity (the input itself, N_SSIM 0), gaussian "
        "(sigma 0.442 nucleus / 0.5 membrane voxels), gaussian-tuned (the sigma fitted on training pairs: "
        "--sigma, or the cards of --weights), resample (to 0.6 um isotropic and back, nothing between)",
    )
    parser.add_argument(
        "--sigma", type=float, default=None, help="gaussian-tuned: this sigma (voxels) for every channel"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="gaussian-tuned: read the per-channel sigma from these weights' cards (default: the weights "
        "inference.py would use)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where SSIM runs (default auto): auto = CUDA if available else CPU; cpu uses the scipy back end",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging verbosity (default INFO)",
    )
    return parser


def _tuned_sigmas(sigma: float | None, weights: Path | None) -> dict[str, float]:
    """The gaussian-tuned sigma per channel: the flag's for every channel, else the model cards'."""
    if sigma is not None:
        return {"nucleus": sigma, "membrane": sigma, "unknown": sigma}
    from fmc.baselines import sigma_of_models
    from fmc.weights import WeightsError, discover_models

    sigmas: dict[str, float] = {}
    for channel in ("nucleus", "membrane"):
        try:
            models = discover_models(weights, channel, None)
        except WeightsError as error:
            log.warning("no weights to read the %s sigma from: %s", channel, error)
            continue
        sigma = sigma_of_models((models.step2, models.step1), channel)
        if sigma is not None:
            sigmas[channel] = sigma
    return sigmas


def main(argv: list[str] | None = None) -> int:
    """CLI entry; exit 0 when at least one case was scored, 1 otherwise, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pred is None and args.baseline is None:
        parser.error("give --pred DIR, or --baseline to score a baseline")
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    start = time.perf_counter()
    sigmas = _tuned_sigmas(args.sigma, args.weights) if args.baseline == "gaussian-tuned" else None
    result = run_evaluation(args.input, args.gt, args.pred, args.baseline, args.device, sigmas)
    if result.rows:
        what = f"baseline: {args.baseline}" if args.baseline else f"predictions: {args.pred}"
        print(f"N_SSIM evaluation ({what})")
        print(format_table(result.rows, channel_means(result.rows)))
    if result.problems:
        print(f"\n{len(result.problems)} case(s) not scored:")
        for line in result.problems:
            print(f"  {line}")
    if args.csv is not None and result.rows:
        write_csv(args.csv, result.rows)
        print(f"\nCSV written to {args.csv}")
    log.info("evaluation took %.1f s", time.perf_counter() - start)
    if not result.rows:
        print("nothing scored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
