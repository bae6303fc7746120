"""Maximum-intensity projections (input | prediction | target) for eyeballing validation cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmc.atomic import atomic_write
from fmc.normalization import PERCENTILE_HIGH, PERCENTILE_LOW


def _to_u8(image: np.ndarray) -> np.ndarray:
    """Each panel by its own p2/p99.8, as the metric normalizes volumes."""
    low, high = np.percentile(image, (PERCENTILE_LOW, PERCENTILE_HIGH))
    scaled = np.clip((image - low) / (high - low if high > low else 1.0), 0, 1)
    return (scaled * 255).astype(np.uint8)


def mip_panel(inp: np.ndarray, pred: np.ndarray, target: np.ndarray, gap: int = 2) -> np.ndarray:
    """One uint8 image: top row the z projections (YX), bottom row the y projections (ZX); columns input,
    prediction, target."""
    rows = []
    for axis in (0, 1):
        panels = [_to_u8(np.asarray(v, dtype=np.float32).max(axis=axis)) for v in (inp, pred, target)]
        spacer = np.full((panels[0].shape[0], gap), 255, dtype=np.uint8)
        rows.append(np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1))
    spacer = np.full((gap, rows[0].shape[1]), 255, dtype=np.uint8)
    return np.concatenate([rows[0], spacer, rows[1]], axis=0)


def save_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG atomically (a reader never sees half a file)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
