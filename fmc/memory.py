"""Memory high-water marks, so logs and benchmarks can say which step set a case's peak.

On a GPU it is the CUDA allocator's peak (what ``--gpu-memory-gib`` caps); on a CPU the
process's peak resident set (``VmHWM``), which then also holds the "device" tensors. Both
are cumulative, never reset: resetting ``VmHWM`` would also erase the peak that a parent
process reads at exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

GIB = float(1 << 30)
#: Voxels per slab, chunk or block where a pass over a volume works piece by piece: 64 MiB per
#: float32 temporary, so no pass needs a second full-size copy.
SLAB_VOXELS = 1 << 24


def high_water_gib(device: torch.device) -> float | None:
    """Peak memory so far in GiB: CUDA allocator on ``cuda``, process RSS otherwise; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def z_slabs(volume: np.ndarray) -> Iterator[slice]:
    """Slices of whole z planes holding about ``SLAB_VOXELS`` voxels each, covering ``volume``."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(volume.shape[1:]))))
    for start in range(0, volume.shape[0], step):
        yield slice(start, min(start + step, volume.shape[0]))
