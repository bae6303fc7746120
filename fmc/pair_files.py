"""The folder layout every pair writer makes (fmc.simulate, fmc.simulate_heldout,
fmc.real_structures): ``image_{id}_{channel}_{angle|fused}.tif``, the draw's parameters as
``image_{id}_{channel}_params.json`` and, where asked, an input | target MIP PNG.

Why one place: :mod:`fmc.data` pairs all three families by these names, so one loop writes them;
the held-out family still shares no forward-model code with the training one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fmc.io.case import KEY_SPELLINGS, METADATA_STYLES
from fmc.simulated_tiff import write_volume

log = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]


class PairParams(Protocol):
    """What the writer needs of a draw's parameters: its spacing, its study, all of it as JSON."""

    spacing: Vec3
    study: int | None

    def to_dict(self) -> dict[str, Any]: ...


def _percentile_u8(image: np.ndarray, low: float = 0.5, high: float = 99.8) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def save_mip_png(path: Path, angle: np.ndarray, fused: np.ndarray, spacing: Vec3) -> None:
    """PNG for a person, input left | target right. Rows: maximum-intensity projection along z,
    the central z slice (membranes are legible there, their MIP is a tangle), and the projection
    along y stretched to the true z/x aspect (shows the detection-depth fall-off, z downwards)."""
    from PIL import Image

    stretch = spacing[0] / spacing[2]

    def panel(vol: np.ndarray) -> np.ndarray:
        top = _percentile_u8(vol.max(0))
        middle = _percentile_u8(vol[vol.shape[0] // 2])
        side = Image.fromarray(_percentile_u8(vol.max(1)))
        height = max(1, round(vol.shape[0] * stretch))
        side = np.asarray(side.resize((vol.shape[2], height), Image.Resampling.BILINEAR))
        gap = np.full((4, vol.shape[2]), 255, np.uint8)
        return np.concatenate([top, gap, middle, gap, side], 0)

    left, right = panel(angle), panel(fused)
    gap = np.full((left.shape[0], 4), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([left, gap, right], 1)).save(path)


def _metadata_styles(i: int, every_style: bool) -> tuple[str, str, str]:
    """Pair ``i``'s (angle style, fused style, key spelling). Every style: rotate through
    :data:`METADATA_STYLES` (the fused file takes the next one, as real pairs sometimes differ)
    and the PhysicalSize spellings; else ImageJ for both, as the held-out family writes."""
    if not every_style:
        return "imagej", "imagej", KEY_SPELLINGS[0]
    return (
        METADATA_STYLES[i % len(METADATA_STYLES)],
        METADATA_STYLES[(i + 1) % len(METADATA_STYLES)],
        KEY_SPELLINGS[i % len(KEY_SPELLINGS)],
    )


def write_pairs(
    out: Path,
    n: int,
    channel: str,
    make_pair: Callable[[int], tuple[np.ndarray, np.ndarray, PairParams]],
    header: dict[str, Any],
    first_id: int = 0,
    *,
    every_style: bool = True,
    mip: bool = True,
) -> list[Path]:
    """Write pairs ``make_pair(0 .. n-1)`` as ``image_{first_id + i}_{channel}_*``; ``header``
    (the regime, the family, where a real truth came from) opens each params JSON. Returns every
    path written, pair by pair: angle, fused, MIP (if ``mip``), params."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i in range(n):
        start = time.perf_counter()
        angle, fused, params = make_pair(i)
        stem = f"image_{first_id + i}_{channel}"
        angle_style, fused_style, spelling = _metadata_styles(i, every_style)
        for kind, volume, style in (("angle", angle, angle_style), ("fused", fused, fused_style)):
            path = out / f"{stem}_{kind}.tif"
            write_volume(
                path,
                volume,
                spacing=params.spacing,
                channel=channel,
                study=params.study,
                style=style,
                key_spelling=spelling,
            )
            written.append(path)
        if mip:
            written.append(out / f"{stem}_mip.png")
            save_mip_png(written[-1], angle, fused, params.spacing)
        meta = out / f"{stem}_params.json"
        meta.write_text(json.dumps({**header, **params.to_dict()}, indent=1))
        written.append(meta)
        log.info(
            "pair %d/%d %s: spacing %s, study %s, %.2f s",
            i + 1,
            n,
            stem,
            params.spacing,
            params.study,
            time.perf_counter() - start,
        )
    return written
