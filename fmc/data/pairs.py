"""Pair ``image_{N}_{channel}_{angle|fused}.tif`` files and reconcile their metadata.

The challenge's training set names files by image id, channel and role; some pairs
(ids 213-399, nucleus) carry different metadata on the two files. The fused file is
the reference: its spacing defines the grid the target was fused on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fmc.io import CaseMetadata

PAIR_PATTERN = re.compile(r"^image_(\d+)_(nucleus|membrane)_(angle|fused)\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class PairedFiles:
    """One training example on disk: a single view and its multiview fusion."""

    image_id: int
    channel: str
    angle: Path
    fused: Path

    @property
    def case_id(self) -> str:
        return f"image_{self.image_id}_{self.channel}"


@dataclass
class PairSearch:
    """Result of scanning a folder: pairs, plus every file that could not be paired and why."""

    pairs: list[PairedFiles] = field(default_factory=list)
    unpaired: list[tuple[Path, str]] = field(default_factory=list)


def find_pairs(folder: Path) -> PairSearch:
    """Scan ``folder`` (not recursive) for angle/fused pairs; every other TIFF is reported, never dropped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    roles: dict[tuple[int, str], dict[str, Path]] = {}
    result = PairSearch()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in (".tif", ".tiff"):
            continue
        match = PAIR_PATTERN.match(path.name)
        if match is None:
            result.unpaired.append((path, "name is not image_{N}_{nucleus|membrane}_{angle|fused}.tif"))
            continue
        key = (int(match.group(1)), match.group(2).lower())
        role = match.group(3).lower()
        slot = roles.setdefault(key, {})
        if role in slot:
            result.unpaired.append((path, f"duplicate {role} file for image {key[0]} {key[1]}"))
            continue
        slot[role] = path
    for (image_id, channel), slot in sorted(roles.items()):
        if "angle" in slot and "fused" in slot:
            result.pairs.append(PairedFiles(image_id, channel, slot["angle"], slot["fused"]))
        else:
            present = next(iter(slot))
            missing = "fused" if present == "angle" else "angle"
            result.unpaired.append((slot[present], f"no {missing} file"))
    return result


@dataclass
class Agreement:
    """The metadata a pair is trained with, and the disagreements found on the way."""

    spacing: tuple[float, float, float]
    spacing_source: str
    channel: str
    study: int | None
    warnings: list[str] = field(default_factory=list)


def reconcile(
    pair: PairedFiles,
    angle: CaseMetadata,
    fused: CaseMetadata,
    *,
    rel_tol: float = 1e-3,
) -> Agreement:
    """Compare the two files' metadata; use the fused file's spacing (else the angle's).

    Returns the warnings instead of logging them: this runs in worker processes whose
    logging is not configured; the parent logs them once.
    """
    warnings: list[str] = []
    pairs = zip(angle.spacing, fused.spacing, strict=True)
    same_spacing = all(math.isclose(a, b, rel_tol=rel_tol) for a, b in pairs)
    if not same_spacing:
        warnings.append(
            f"spacing differs: angle {tuple(angle.spacing)} vs fused {tuple(fused.spacing)} (using fused)"
        )
    if fused.spacing_valid:
        spacing, source = tuple(fused.spacing), "fused"
    elif angle.spacing_valid:
        spacing, source = tuple(angle.spacing), "angle"
        warnings.append("fused file has no valid spacing: using the angle file's")
    else:
        spacing, source = tuple(fused.spacing), "default"
        warnings.append(f"neither file has a valid spacing: using the default {tuple(fused.spacing)}")
    for name, meta in (("angle", angle), ("fused", fused)):
        if meta.channel not in ("unknown", pair.channel):
            warnings.append(f"{name} metadata says channel {meta.channel!r}, file name says {pair.channel!r}")
    if angle.study is not None and fused.study is not None and angle.study != fused.study:
        warnings.append(f"study differs: angle {angle.study} vs fused {fused.study} (using fused)")
    study = fused.study if fused.study is not None else angle.study
    return Agreement(
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        spacing_source=source,
        channel=pair.channel,
        study=study,
        warnings=warnings,
    )
