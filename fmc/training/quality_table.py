"""``train.py table``: the one quality table of the README and the model card, from exported weights.

Rows are methods, the baselines of :mod:`fmc.baselines` first, then the model's variants run
through the real pipeline (step 1 alone, two steps, each DW form); columns are channel x data
family (say, the training family and the held-out family). Each cell is the mean N_SSIM and, in
brackets, the worst case: the metric is dominated by outliers, so a method must not sink one case.
Baselines are computed once per case and shared by every variant.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmc.baselines import BASELINES, baseline_prediction, sigma_of_models
from fmc.infer import labelled_projections, mip_projections
from fmc.io import read_case
from fmc.metrics import n_ssim
from fmc.pipeline import FusionPipeline
from fmc.training.evaluate import pipeline_config_for
from fmc.training.pairs import find_pairs, reconcile
from fmc.training.preview import save_png
from fmc.weights import discover_models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One way to run the model: which steps, which DW form."""

    name: str
    step2: bool
    dw: str


VARIANTS = (
    Variant("step 1", False, "none"),
    Variant("step 1 + DW (paper)", False, "paper"),
    Variant("two steps", True, "none"),
    Variant("two steps + DW (paper)", True, "paper"),
    Variant("two steps + DW (released)", True, "released"),
)


def variant_name(label: str, variant: Variant, has_step1: bool) -> str:
    """The row's name: ``label`` (extra weights) first; a model without step 1 runs "patch only"."""
    name = variant.name
    if not has_step1:
        name = name.replace("two steps", "patch only")
    return f"{label}: {name}" if label else name


def score_family(
    weights: Path,
    data: Path,
    family: str,
    device: torch.device,
    overlap: float = 0.5,
    extra: dict[str, Path] | None = None,
    previews: dict[str, Path] | None = None,
) -> list[dict]:
    """One row per (case, method) for every pair in ``data``.

    ``weights`` gives every variant; each of ``extra`` (label -> weights root) adds its two-step
    variants as rows named ``label: ...`` (other training runs beside the same baselines). The
    networks run once per (weights, steps) and case; the DW forms reuse that pass
    (:meth:`FusionPipeline.run_each_dw`, the bytes of a full run with that form). ``previews``
    (case id -> PNG path): labelled MIPs of those cases, input | each weights' two steps | target,
    for what N_SSIM does not show (fine detail).
    """
    sources = {"": weights, **(extra or {})}
    rows: list[dict] = []
    pipelines: dict[tuple[str, str, bool], FusionPipeline | None] = {}
    for pair in find_pairs(data).pairs:
        start = time.perf_counter()
        angle, fused = read_case(pair.angle), read_case(pair.fused)
        spacing = reconcile(pair, angle.meta, fused.meta).spacing
        inp, gt = angle.volume, fused.volume
        scores: dict[str, float] = {}
        preview = (previews or {}).get(pair.case_id)
        columns = [("input", mip_projections(inp))] if preview else []
        sigma = None
        for label, root in sources.items():
            for step2 in (False, True):
                variants = [v for v in VARIANTS if v.step2 == step2 and (step2 or not label)]
                if not variants:
                    continue
                key = (pair.channel, label, step2)
                if key not in pipelines:
                    models = discover_models(root, pair.channel, None, device=device)
                    if models.step1 is None and not step2:  # patch only: there is no step-1 row
                        pipelines[key] = None
                        continue
                    config = pipeline_config_for(models, overlap, 2, False, device, "none", step2)
                    pipelines[key] = FusionPipeline(models, config, device)
                pipeline = pipelines[key]
                if pipeline is None:
                    continue
                if not label:
                    sigma = sigma_of_models((pipeline.step2_model, pipeline.step1_model), pair.channel)
                outputs = pipeline.run_each_dw(inp, spacing, tuple(v.dw for v in variants))
                for variant in variants:
                    name = variant_name(label, variant, pipeline.step1_model is not None)
                    scores[name] = n_ssim(outputs[variant.dw], gt, inp)
                    if preview and step2 and variant.dw == "none":
                        columns.append((name, mip_projections(outputs["none"])))
        for name in BASELINES:
            if name == "gaussian-tuned" and sigma is None:
                continue
            scores[name] = n_ssim(
                baseline_prediction(name, inp, pair.channel, spacing, sigma, device), gt, inp
            )
        if preview:
            columns.append(("target (fused views)", mip_projections(gt)))
            save_png(preview, labelled_projections(columns, spacing))
        for method, value in scores.items():
            rows.append(
                {
                    "family": family,
                    "case": pair.case_id,
                    "channel": pair.channel,
                    "method": method,
                    "n_ssim": value,
                }
            )
        log.info(
            "%s %s (%.1f s): %s",
            family,
            pair.case_id,
            time.perf_counter() - start,
            " ".join(f"{k}={v:+.3f}" for k, v in scores.items()),
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """Methods down, (channel, family) across; 'mean (worst)' per cell."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in BASELINES if m in seen] + [m for m in seen if m not in BASELINES]
    columns = sorted({(r["channel"], r["family"]) for r in rows}, key=lambda c: (c[0] != "nucleus", c[1]))
    head = "| method | " + " | ".join(f"{ch} {fam} (n={_count(rows, ch, fam)})" for ch, fam in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = []
        for channel, family in columns:
            values = [
                r["n_ssim"]
                for r in rows
                if (r["method"], r["channel"], r["family"]) == (method, channel, family)
            ]
            cells.append(f"{np.mean(values):+.3f} ({np.min(values):+.3f})" if values else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(rows: list[dict], channel: str, family: str) -> int:
    return len({r["case"] for r in rows if r["channel"] == channel and r["family"] == family})


def write(out: Path, rows: list[dict]) -> str:
    """cases.csv (every score) and table.md; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["family", "case", "channel", "method", "n_ssim"])
        writer.writeheader()
        writer.writerows({**r, "n_ssim": f"{r['n_ssim']:.6f}"} for r in rows if math.isfinite(r["n_ssim"]))
    table = markdown(rows)
    (out / "table.md").write_text("N_SSIM: mean (worst case) over cases\n\n" + table)
    return table
