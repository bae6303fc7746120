"""What gpu_check's parts write and read back: a part's JSON, pytest's JUnit XML, two outputs and
two step-2 settings compared.

Why the parts' JSON is rewritten after every update: a part killed at its limit must still
leave what it had measured; the GPU is lent rarely and briefly, so no figure may be lost to a
late crash.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from benchmarks.cuda_agreement import differences
from benchmarks.gpu_check_plan import PARTS_BY_NUMBER, Part, Settings

#: Fields of inference.py's ``step2`` report entry that differ from run to run for timing's sake
#: alone: not part of the setting step 2 ran with.
STEP2_TIMING_FIELDS = ("predicted_seconds",)


class PartReport:
    """A part's JSON, rewritten (atomically) after every update."""

    def __init__(self, path: Path, part: Part, settings: Settings) -> None:
        self.path = path
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {
            "part": part.number,
            "name": part.name,
            "title": part.title,
            "device_requested": settings.device,
            "quick": settings.quick,
            "ok": None,
        }
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.start, 3)
        write_json(self.path, self.data)


def load_part(out: Path, number: int) -> dict | None:
    """Part ``number``'s JSON in ``out``, or None when it wrote none (not run, or killed at once)."""
    try:
        return json.loads((out / PARTS_BY_NUMBER[number].filename).read_text())
    except (OSError, ValueError):
        return None


def parse_junit(path: Path) -> dict:
    """Counts and the names of failed tests from pytest's JUnit XML (no pytest plugin needed)."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    skipped: list[str] = []
    if not path.exists():
        return {**counts, "failed_tests": failed, "skip_reasons": skipped}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skipped.append(f"{name}: {skip.get('message', '')}")
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skip_reasons": sorted(set(skipped))[:20]}


def compare_volumes(reference: Path, other: Path) -> dict:
    """How far ``other`` is from ``reference`` (uint16 TIFFs), in voxels and, where big enough, SSIM."""
    import numpy as np
    import tifffile

    from fmc.metrics import ssim3d
    from fmc.normalization import percentile_normalize

    a, b = tifffile.imread(reference), tifffile.imread(other)
    if a.shape != b.shape:
        return {"same_shape": False, "shapes": [list(a.shape), list(b.shape)]}
    result: dict[str, Any] = {"same_shape": True, **differences(a, b)}
    if min(a.shape) >= 11:  # the SSIM window's size
        result["ssim_vs_reference"] = round(
            ssim3d(percentile_normalize(a.astype(np.float32)), percentile_normalize(b.astype(np.float32))), 6
        )
    return result


def step2_setting(step2: dict | None) -> dict | None:
    """The setting step 2 ran with, from inference.py's ``step2`` report entry: timings left out."""
    if step2 is None:
        return None
    return {key: value for key, value in step2.items() if key not in STEP2_TIMING_FIELDS}


def step2_differences(first: dict | None, second: dict | None) -> dict[str, list]:
    """The fields where two runs' step-2 settings differ, each as [first, second]."""
    a, b = step2_setting(first) or {}, step2_setting(second) or {}
    return {key: [a.get(key), b.get(key)] for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}
