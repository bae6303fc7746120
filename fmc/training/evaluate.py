"""``train.py evaluate``: exported weights through the real pipeline on held-out pairs, beside the baselines.

Per case: identity (the input itself, N_SSIM 0 by definition, computed as a check), the
Gaussian baseline of fmc.metrics, and the model through fmc.pipeline.FusionPipeline.run on
the original grid, scored with fmc.metrics.n_ssim as the challenge does. The table is per
channel (the challenge scores nucleus and membrane apart).
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
from fmc.io import CaseError, read_case
from fmc.metrics import gaussian_baseline, n_ssim
from fmc.pipeline import FusionPipeline, PipelineConfig, trained_settings
from fmc.tiling import TilingConfig
from fmc.training.pairs import PairedFiles, find_pairs, reconcile
from fmc.training.split import read_split
from fmc.weights import ModelSet, discover_models

log = logging.getLogger(__name__)

METHODS = ("identity", "gaussian", "model")


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
    overlap: float = 0.5
    batch: int = 2
    tta: bool = False
    progress: bool = True


@dataclass
class CaseScore:
    case_id: str
    channel: str
    study: int | None
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def pipeline_config_for(
    models: ModelSet, overlap: float, batch: int, tta: bool, device: torch.device
) -> PipelineConfig:
    """The pipeline as the model was trained: global size, patch and DW from the model cards."""
    settings = trained_settings(models)
    patch = int(settings.get("patch", 128))
    tiling = TilingConfig(patch=(patch,) * 3, overlap=overlap, batch=batch)
    return PipelineConfig(
        kernels=KernelOptions(precision="bf16" if device.type == "cuda" else "fp32"),
        step1=models.step1 is not None,
        step2=models.step2 is not None,
        difference_weighting=bool(settings.get("difference_weighting", True)),
        max_filter=int(settings.get("max_filter", 3)),
        tta=tta,
        global_size=int(settings.get("global_size", 224)),
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
    from fmc.training.cache import resolve_device

    device = torch.device(resolve_device(config.device))
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
            pipelines[key] = FusionPipeline(
                models, pipeline_config_for(models, config.overlap, config.batch, config.tta, device), device
            )
        pred, _ = pipelines[key].run(angle.volume, agreement.spacing)
        inp, gt = angle.volume, fused.volume
        backend = device if device.type == "cuda" else None
        scores = {
            "identity": n_ssim(inp, gt, inp, device=backend),
            "gaussian": n_ssim(gaussian_baseline(inp, pair.channel), gt, inp, device=backend),
            "model": n_ssim(pred, gt, inp, device=backend),
        }
        results.append(
            CaseScore(pair.case_id, pair.channel, agreement.study, scores, time.perf_counter() - start)
        )
        log.info("%s: %s", pair.case_id, " ".join(f"{k}={v:+.4f}" for k, v in scores.items()))
    summary = summarize(results)
    write_tables(config.out, results, summary)
    return results, summary


def summarize(results: list[CaseScore]) -> list[dict[str, Any]]:
    """Mean and standard deviation of N_SSIM per channel and method."""
    rows = []
    for channel in sorted({r.channel for r in results}):
        group = [r for r in results if r.channel == channel]
        for method in METHODS:
            values = np.array([r.scores[method] for r in group], dtype=np.float64)
            rows.append(
                {
                    "channel": channel,
                    "method": method,
                    "cases": len(values),
                    "n_ssim_mean": float(values.mean()),
                    "n_ssim_std": float(values.std()),
                }
            )
    return rows


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """One row per channel, one column per method: 'mean ± std'."""
    lines = ["| channel | cases | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for channel in sorted({r["channel"] for r in summary}):
        cells = {r["method"]: r for r in summary if r["channel"] == channel}
        values = " | ".join(f"{cells[m]['n_ssim_mean']:+.4f} ± {cells[m]['n_ssim_std']:.4f}" for m in METHODS)
        lines.append(f"| {channel} | {cells[METHODS[0]]['cases']} | {values} |")
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
            handle, fieldnames=["channel", "method", "cases", "n_ssim_mean", "n_ssim_std"]
        )
        writer.writeheader()
        writer.writerows(summary)
    (out / "summary.md").write_text(
        "N_SSIM per channel (mean ± std over cases)\n\n" + markdown_table(summary)
    )
