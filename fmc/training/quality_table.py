"""``train.py table``: the one quality table (resources/weights/MODEL_CARD.md), from exported weights.

Rows are methods, the baselines of :mod:`fmc.baselines` first, then the model's variants run
through the real pipeline (step 1 alone, two steps, each DW form, the safeguard and the native
detail on and off); columns are channel x data family (say, each regime's training and held-out
families). Each cell is the mean N_SSIM and, in brackets, the worst case: the metric is dominated
by outliers, so a method must not sink one case. A first line gives SSIM(input, fused), mean
(range), per column: how close the inputs already were. Baselines are computed once per case and
shared by every variant.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fmc.baselines import BASELINES, baseline_prediction, sigma_of_models
from fmc.data.pairs import find_pairs, reconcile
from fmc.io import read_case
from fmc.method import MethodSettings
from fmc.metrics import normalized_gain, ssim_against
from fmc.pipeline import FusionPipeline
from fmc.projections import labelled_projections, mip_projections
from fmc.training.evaluate import pipeline_config_for
from fmc.training.preview import save_png
from fmc.weights import discover_models

log = logging.getLogger(__name__)


#: The row of SSIM(input, fused) per column.
INPUT_SSIM = "SSIM(input, fused)"


@dataclass(frozen=True)
class Variant:
    """One way to run the model: which steps, and settings that act after the networks (the DW
    form, the safeguard, the native detail) in place of the card's."""

    name: str
    step2: bool
    dw: str
    overrides: tuple[tuple[str, float], ...] = ()

    def settings(self, card: MethodSettings) -> MethodSettings:
        return replace(card, difference_weighting=self.dw, **dict(self.overrides))


VARIANTS = (
    Variant("step 1", False, "none"),
    Variant("step 1 + DW (paper)", False, "paper"),
    Variant("two steps", True, "none"),
    Variant(
        "two steps, safeguard off (the whole change in every case)",
        True,
        "none",
        (("change_strength", 1.0), ("closeness_threshold", 1.0)),
    ),
    Variant(
        "two steps, every case counted close (the close strength only)",
        True,
        "none",
        (("closeness_threshold", 0.0),),
    ),
    Variant(
        "two steps, networks' change off (native detail only)",
        True,
        "none",
        (("change_strength", 0.0), ("close_change_strength", 0.0)),
    ),
    Variant(
        "two steps, all native detail kept",
        True,
        "none",
        (("detail_noise_weight", 0.0), ("detail_sigma", 0.0)),
    ),
    Variant("two steps, through the 0.6 um round trip", True, "none", (("native_detail", 0.0),)),
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
    (:meth:`FusionPipeline.run_each_setting`, the bytes of a full run with those settings). ``previews``
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
        ssim_in = ssim_against(inp, gt)  # N_SSIM's reference, computed once per case for every row
        scores: dict[str, float] = {}
        preview = (previews or {}).get(pair.case_id)
        columns = [("input", mip_projections(inp))] if preview else []
        sigma = None
        for label, root in sources.items():
            for step2 in (False, True):
                variants = [
                    v for v in VARIANTS if v.step2 == step2 and (not label or (step2 and not v.overrides))
                ]
                if not variants:
                    continue
                key = (pair.channel, label, step2)
                if key not in pipelines:
                    models = discover_models(root, pair.channel, None, device=device)
                    if models.step1 is None and not step2:  # patch only: there is no step-1 row
                        pipelines[key] = None
                        continue
                    config = pipeline_config_for(models, overlap, 2, False, device, None, step2)
                    pipelines[key] = FusionPipeline(models, config, device)
                pipeline = pipelines[key]
                if pipeline is None:
                    continue
                if not label:
                    sigma = sigma_of_models((pipeline.step2_model, pipeline.step1_model), pair.channel)
                settings = [variant.settings(pipeline.settings) for variant in variants]
                outputs = pipeline.run_each_setting(inp, spacing, settings)
                for variant, output in zip(variants, outputs, strict=True):
                    name = variant_name(label, variant, pipeline.step1_model is not None)
                    scores[name] = normalized_gain(ssim_against(output, gt), ssim_in)
                    if preview and step2 and variant.dw == "none" and not variant.overrides:
                        columns.append((name, mip_projections(output)))
        scores[INPUT_SSIM] = ssim_in
        for name in BASELINES:
            if name == "gaussian-tuned" and sigma is None:
                continue
            baseline = baseline_prediction(name, inp, pair.channel, spacing, sigma, device)
            scores[name] = normalized_gain(ssim_against(baseline, gt), ssim_in)
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
                    "value": value,
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
    """Methods down, (channel, family) across; 'mean (worst)' per cell, and a first line of
    SSIM(input, fused) as 'mean (lowest-highest)'."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    first = [INPUT_SSIM, *BASELINES]
    methods = [m for m in first if m in seen] + [m for m in seen if m not in first]
    columns = sorted({(r["channel"], r["family"]) for r in rows}, key=lambda c: (c[0] != "nucleus", c[1]))
    head = "| method | " + " | ".join(f"{ch} {fam} (n={_count(rows, ch, fam)})" for ch, fam in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = []
        for channel, family in columns:
            values = [
                r["value"]
                for r in rows
                if (r["method"], r["channel"], r["family"]) == (method, channel, family)
            ]
            if not values:
                cells.append("n/a")
            elif method == INPUT_SSIM:
                cells.append(f"{np.mean(values):.2f} ({np.min(values):.2f}-{np.max(values):.2f})")
            else:
                cells.append(f"{np.mean(values):+.3f} ({np.min(values):+.3f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(rows: list[dict], channel: str, family: str) -> int:
    return len({r["case"] for r in rows if r["channel"] == channel and r["family"] == family})


def write(out: Path, rows: list[dict]) -> str:
    """cases.csv (every score: N_SSIM, or SSIM(input, fused) in its own rows) and table.md; returns
    the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["family", "case", "channel", "method", "value"])
        writer.writeheader()
        writer.writerows({**r, "value": f"{r['value']:.6f}"} for r in rows if math.isfinite(r["value"]))
    table = markdown(rows)
    (out / "table.md").write_text(
        f"N_SSIM: mean (worst case) over cases; {INPUT_SSIM}: mean (range)\n\n" + table
    )
    return table
