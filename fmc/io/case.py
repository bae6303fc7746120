"""The typed result of reading a case (:class:`Case`, :class:`CaseMetadata`) and the fatal-fault error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METADATA_STYLES = ("shaped", "imagej", "keyvalue", "ome")
KEY_SPELLINGS = ("PhysicalSizeX", "physicalsizex", "physical_size_x")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAUSIBLE_SPACING_UM = (1e-3, 1e3)
"""Voxel sizes outside this range (micrometres) are treated as invalid metadata."""


class CaseError(Exception):
    """A file that cannot be processed; ``str(error)`` is ``"<file name>: <reason>"``."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever tifffile put in it
        super().__init__(f"{self.path.name}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # default pickling would call CaseError(message) and fail in multiprocessing workers
        return (type(self), (self.path, self.reason))


@dataclass
class CaseMetadata:
    """Normalized metadata of one case; ``raw`` is what the file carried, kept for writing back."""

    spacing: tuple[float, float, float]
    spacing_valid: bool
    channel: str
    study: int | None
    unit: str
    raw: dict
    sources: dict[str, str]
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)  # keys fmc adds to the output (intensity map)


@dataclass
class Case:
    """One input file: its ZYX volume (native dtype, finite) and metadata."""

    path: Path
    volume: np.ndarray
    meta: CaseMetadata
