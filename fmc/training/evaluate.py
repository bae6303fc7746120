"""``train.py evaluate``: exported weights through the real pipeline on held-out pairs, beside the baselines.

Per case: the baselines of :mod:`fmc.baselines` (identity, N_SSIM 0 by definition and computed
as a check; the public Gaussian; the Gaussian with the sigma tuned on training pairs, from the
weights' card; the pipeline's own resampling), and the model through
fmc.pipeline.FusionPipeline.run on the original grid, scored with fmc.metrics.n_ssim as the
challenge does. The table is per channel (the challenge scores nucleus and membrane apart), with
the mean and the worst case: the metric is dominated by outliers.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fmc.acceleration import KernelOptions
from fmc.baselines import BASELINES, baseline_prediction, sigma_of_models
from fmc.data.pairs import PairedFiles, find_pairs, reconcile
from fmc.data.split import read_split
from fmc.io import CaseError, read_case
from fmc.metrics import n_ssim
from fmc.pipeline import FusionPipeline, PipelineConfig, card_settings
from fmc.tiling import TilingConfig
from fmc.weights import ModelSet, discover_models

log = logging.getLogger(__name__)

METHODS = (*BASELINES, "model")
TILING_DEFAULTS = TilingConfig()


@dataclass
class EvaluateConfig:
    weights: Path
    data: Path
    out: Path
    split_csv: Path | None = None
    subset: str = "all"  # all | train | val
    device: str = "auto"
    channels: tuple[str, ...] = ()
    max_cases: int = 0
    overlap: float = TILING_DEFAULTS.overlap  # as inference.py's
    batch: int = TILING_DEFAULTS.batch
    tta: bool = False
    dw: str | None = None  # override the card's DW form ("paper" | "released" | "none")
    step2: bool = True  # False: step 1 alone (the table's "step 1" rows)
    progress: bool = True


@dataclass
class CaseScore:
    case_id: str
    channel: str
    study: int | None
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def pipeline_config_for(
    models: ModelSet,
    overlap: float,
    batch: int,
    tta: bool,
    device: torch.device,
    dw: str | None = None,
    step2: bool = True,
) -> PipelineConfig:
    """The pipeline as the model was trained: the method settings come from the cards (``dw``
    overrides their DW form), the patch too (MethodSettings.tile_patch, as inference.py runs it)."""
    tiling = TilingConfig(patch=card_settings(models).tile_patch(), overlap=overlap, batch=batch)
    return PipelineConfig(
        kernels=KernelOptions(precision="bf16" if device.type == "cuda" else "fp32"),
        step1=models.step1 is not None,
        step2=step2 and models.step2 is not None,
        difference_weighting=dw,
        tta=tta,
        tiling=tiling,
    )


def select_pairs(config: EvaluateConfig) -> list[PairedFiles]:
    search = find_pairs(config.data)
    for path, reason in search.unpaired:
        log.warning("unpaired: %s: %s", path.name, reason)
    pairs = [p for p in search.pairs if not config.channels or p.channel in config.channels]
    if config.subset != "all":
        if config.split_csv is None:
            raise ValueError(f"--split {config.subset} needs --run RUNDIR (its split.csv) or --split-csv")
        wanted = {r.case_id for r in read_split(config.split_csv) if r.subset == config.subset}
        pairs = [p for p in pairs if p.case_id in wanted]
    if config.max_cases > 0:
        pairs = pairs[: config.max_cases]
    return pairs


def evaluate(config: EvaluateConfig) -> tuple[list[CaseScore], list[dict[str, Any]]]:
    """Score every selected pair; writes per-case CSV, summary CSV and markdown to ``config.out``."""
    from fmc.device import select_device

    device = select_device(config.device)
    pairs = select_pairs(config)
    if not pairs:
        raise ValueError(f"no pair to evaluate in {config.data} (subset {config.subset})")
    pipelines: dict[tuple[str, int | None], FusionPipeline] = {}
    results: list[CaseScore] = []
    for pair in tqdm(pairs, desc="evaluate", unit="case", disable=not config.progress or None):
        start = time.perf_counter()
        try:
            angle, fused = read_case(pair.angle), read_case(pair.fused)
        except CaseError as error:
            log.error("skipped %s: %s", pair.case_id, error)
            continue
        agreement = reconcile(pair, angle.meta, fused.meta)
        key = (pair.channel, agreement.study)
        if key not in pipelines:
            models = discover_models(config.weights, pair.channel, agreement.study, device=device)
            pipeline_config = pipeline_config_for(
                models, config.overlap, config.batch, config.tta, device, config.dw, config.step2
            )
            pipelines[key] = FusionPipeline(models, pipeline_config, device)
        pipeline = pipelines[key]
        pred, _ = pipeline.run(angle.volume, agreement.spacing)
        inp, gt = angle.volume, fused.volume
        backend = device if device.type == "cuda" else None
        sigma = sigma_of_models((pipeline.step2_model, pipeline.step1_model), pair.channel)
        scores = {}
        for name in BASELINES:
            if name == "gaussian-tuned" and sigma is None:
                scores[name] = float("nan")  # the cards hold no fitted sigma: see fmc.baselines
                continue
            guess = baseline_prediction(name, inp, pair.channel, agreement.spacing, sigma, device)
            scores[name] = n_ssim(guess, gt, inp, device=backend)
        scores["model"] = n_ssim(pred, gt, inp, device=backend)
        results.append(
            CaseScore(pair.case_id, pair.channel, agreement.study, scores, time.perf_counter() - start)
        )
        log.info("%s: %s", pair.case_id, " ".join(f"{k}={v:+.4f}" for k, v in scores.items()))
    summary = summarize(results)
    write_tables(config.out, results, summary)
    return results, summary


def summarize(results: list[CaseScore]) -> list[dict[str, Any]]:
    """Mean, standard deviation and worst case of N_SSIM per channel and method (NaN cases skipped)."""
    rows = []
    for channel in sorted({r.channel for r in results}):
        group = [r for r in results if r.channel == channel]
        for method in METHODS:
            values = np.array([r.scores[method] for r in group], dtype=np.float64)
            values = values[np.isfinite(values)]
            rows.append(
                {
                    "channel": channel,
                    "method": method,
                    "cases": len(values),
                    "n_ssim_mean": float(values.mean()) if values.size else float("nan"),
                    "n_ssim_std": float(values.std()) if values.size else float("nan"),
                    "n_ssim_worst": float(values.min()) if values.size else float("nan"),
                }
            )
    return rows


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """One row per channel, one column per method: 'mean (worst)'."""
    lines = [
        "| channel | cases | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for channel in sorted({r["channel"] for r in summary}):
        cells = {r["method"]: r for r in summary if r["channel"] == channel}
        values = " | ".join(
            f"{cells[m]['n_ssim_mean']:+.4f} ({cells[m]['n_ssim_worst']:+.4f})" for m in METHODS
        )
        lines.append(f"| {channel} | {cells['model']['cases']} | {values} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, results: list[CaseScore], summary: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "channel", "study", *(f"n_ssim_{m}" for m in METHODS), "seconds"])
        for r in results:
            writer.writerow(
                [r.case_id, r.channel, r.study, *(f"{r.scores[m]:.6f}" for m in METHODS), f"{r.seconds:.2f}"]
            )
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["channel", "method", "cases", "n_ssim_mean", "n_ssim_std", "n_ssim_worst"]
        )
        writer.writeheader()
        writer.writerows(summary)
    (out / "summary.md").write_text(
        "N_SSIM per channel: mean (worst case) over cases\n\n" + markdown_table(summary)
    )
