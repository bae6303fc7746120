"""Maximum-intensity projections and labelled preview images, for a person to eyeball a volume.

Used by inference (the optional preview PNG beside each output) and by the training quality
table (input | models | baselines | target); no command line of its own.
"""

from __future__ import annotations

import numpy as np

from fmc.normalization import PERCENTILE_HIGH, PERCENTILE_LOW


def _u8(projection: np.ndarray) -> np.ndarray:
    """Contrast-stretched to uint8 (2nd-99.8th percentile), as the metric normalizes volumes."""
    projection = projection.astype(np.float32)
    low, high = np.percentile(projection, (PERCENTILE_LOW, PERCENTILE_HIGH))
    scaled = np.clip((projection - low) / (high - low if high > low else 1.0), 0, 1)
    return (scaled * 255).astype(np.uint8)


def mip_projections(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-intensity projections: XY (along z) and XZ (along y, where depth blur shows), uint8."""
    return _u8(volume.max(axis=0)), _u8(volume.max(axis=1))


def preview_image(
    input_projection: tuple[np.ndarray, np.ndarray],
    fused: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """One labelled uint8 image: columns "input" and "fused", rows the XY and the XZ projection."""
    return labelled_projections([("input", input_projection), ("fused", mip_projections(fused))], spacing)


def labelled_projections(
    columns: list[tuple[str, tuple[np.ndarray, np.ndarray]]],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """One labelled uint8 image: a column per (label, projections), rows the XY and the XZ projection.

    The XZ rows are stretched to the physical z/x aspect, so a coarse z step does not squash them.
    """
    from PIL import Image, ImageDraw

    z_um, _, x_um = spacing
    aspect = z_um / x_um if x_um > 0 and z_um > 0 else 1.0
    rows = []
    for row, (name, stretch) in enumerate((("XY (max over z)", 1.0), ("XZ (max over y)", aspect))):
        panels = []
        for label, projections in columns:
            panel = Image.fromarray(projections[row])
            height = max(1, min(4096, round(panel.height * stretch)))
            panel = panel.resize((panel.width, height), Image.NEAREST) if height != panel.height else panel
            canvas = Image.new("L", (panel.width, panel.height + 14), 0)
            canvas.paste(panel, (0, 14))
            ImageDraw.Draw(canvas).text((3, 1), f"{label} | {name}", fill=255)
            panels.append(np.asarray(canvas))
        gap = np.full((panels[0].shape[0], 4), 128, dtype=np.uint8)
        parts = [panels[0]]
        for panel in panels[1:]:
            parts += [gap, panel]
        rows.append(np.concatenate(parts, axis=1))
    gap = np.full((4, rows[0].shape[1]), 128, dtype=np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)
