"""How far fmc's CUDA output may be from its CPU output, per ``--precision``.

Why one module: the suite's CPU-vs-GPU test (tests/test_infer.py) and gpu_check part 1 judge
the same claim, that the CUDA path computes what the CPU path computes up to float arithmetic;
two copies of the bound drift apart. The bounds are fractions of the CPU output's range
(max - min), so they hold whatever the intensities. Neither figure has been measured on a GPU
yet: gpu_check part 1 is where they are first checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """The largest max and mean |GPU - CPU| allowed, as fractions of the CPU output's range."""

    max_fraction_of_range: float
    mean_fraction_of_range: float

    def admits(self, differences: dict) -> bool:
        """Whether :func:`differences` of two outputs are within this tolerance."""
        return (
            differences["max_abs_diff_fraction_of_range"] <= self.max_fraction_of_range
            and differences["mean_abs_diff_fraction_of_range"] <= self.mean_fraction_of_range
        )


#: fp32 (cuDNN may use TF32 for convolutions); ``auto``, the CUDA default, is float16 weights:
#: three times the fp32 bounds.
TOLERANCES = {"fp32": Tolerance(0.01, 0.001), "auto": Tolerance(0.03, 0.003)}


def differences(reference: np.ndarray, other: np.ndarray) -> dict:
    """|other - reference| of two same-shape volumes, in intensity units and as fractions of
    ``reference``'s range (at least 1, so a constant volume divides safely)."""
    a, b = reference.astype(np.int64), other.astype(np.int64)
    difference = np.abs(a - b)
    span = max(1, int(a.max()) - int(a.min()))
    return {
        "identical": bool(not difference.any()),
        "reference_range": span,
        "max_abs_diff": int(difference.max()),
        "mean_abs_diff": round(float(difference.mean()), 4),
        "max_abs_diff_fraction_of_range": round(float(difference.max()) / span, 6),
        "mean_abs_diff_fraction_of_range": round(float(difference.mean()) / span, 7),
        "fraction_of_voxels_over_1pct_of_range": round(float((difference > 0.01 * span).mean()), 7),
    }
