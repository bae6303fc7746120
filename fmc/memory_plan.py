"""Before a case allocates anything big: the grid its spacing implies, and the memory that grid needs.

Why: the method resamples every case to 0.6 um, so the spacing alone decides the working grid. A
valid but extreme spacing can ask for more memory than any machine has (4x4x4 voxels at 999 um
imply a 6660^3 grid) or shrink a stack to a single voxel. Such a case must be refused with one line
naming the spacing, or fused at its native resolution, before anything big is allocated: never a
traceback, a retry or a constant output. Three rules, checked from shapes alone:

- **too small** (:func:`fusion_spacing`): when the 0.6 um grid would have fewer than
  :data:`MIN_GRID_AXIS` voxels on an axis that has more, the case is fused at its native
  resolution (as if already 0.6 um isotropic, no resampling) with a warning;
- **too large for the input** (:data:`MAX_GRID_GROWTH`): a grid with that many times the input's
  voxels is not a lightsheet stack but a spacing typo; refused with one line;
- **too large for the machine** (:func:`check_memory`): the buffers the pipeline holds at once,
  estimated from the grid, the step-1 cube and the patch batch, against the host (and GPU)
  memory available now; refused with one line before allocating.
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmc.io import CaseError
from fmc.resample import isotropic_shape

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
GIB = float(1 << 30)
FLOAT32 = 4
#: Fewer voxels than this on an axis of the 0.6 um grid (where the input has more) is no grid to fuse on.
MIN_GRID_AXIS = 4
#: The most voxels the 0.6 um grid may hold per input voxel: 5x per axis (3 um isotropic input).
#: Real FuseMyCells stacks (0.2-0.4 um in x/y, 0.5-2 um in z) give 0.2-2.
MAX_GRID_GROWTH = 125
#: A network layer keeps about this many feature maps of its width alive at once (input, output, skip).
LIVE_FEATURE_MAPS = 3


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _spacing_text(spacing: tuple[float, ...]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


def _voxels_text(count: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return str(count)


def fusion_spacing(
    name: str, shape: Shape3, spacing: tuple[float, float, float], target: float
) -> tuple[float, float, float]:
    """The spacing to fuse with: the metadata's, or ``target`` isotropic (native resolution, no
    resampling) when the ``target`` grid would be too small to fuse on."""
    grid = isotropic_shape(shape, spacing, target)
    if all(g >= min(n, MIN_GRID_AXIS) for g, n in zip(grid, shape, strict=True)):
        return spacing
    log.warning(
        "%s: spacing %s um shrinks the %s stack to a %s grid at %g um (fewer than %d voxels on an "
        "axis): fused at its native resolution instead (treated as %g um isotropic, no resampling); "
        "the output keeps the input's spacing metadata",
        name,
        _spacing_text(spacing),
        _shape_text(shape),
        _shape_text(grid),
        target,
        MIN_GRID_AXIS,
        target,
    )
    return (target, target, target)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one case holds at its peak: on the compute device, and on the host besides the input."""

    grid: Shape3
    device_bytes: int
    host_bytes: int


def plan_memory(
    shape: Shape3,
    unsigned16: bool,
    spacing: tuple[float, float, float],
    target: float,
    *,
    global_size: int | None,
    patch: Shape3 | None,
    batch: int,
    width: int,
    dw: bool,
) -> MemoryPlan:
    """The case's peak, from shapes alone.

    ``global_size`` / ``patch`` None: that step does not run; ``width``: the widest first-level
    channel count of the networks; ``unsigned16``: a uint16 input (16 bits on the device, the output
    written into it). It counts the input on the device, the 0.6 um volume, step 2's blended output
    (or step 1's upsampled one), one more 0.6 um volume for difference weighting, the step-1 cube and
    one batch of padded patches with their feature maps, and the uint16 output.
    """
    grid = isotropic_shape(shape, spacing, target)
    voxels, inputs = math.prod(grid), math.prod(shape)
    device = inputs * (2 if unsigned16 else FLOAT32) + 2 * voxels * FLOAT32
    if dw:
        device += voxels * FLOAT32
    if global_size is not None:
        device += global_size**3 * FLOAT32 * (2 + LIVE_FEATURE_MAPS * width)
    if patch is not None:
        padded = math.prod(max(g, p) for g, p in zip(grid, patch, strict=True))
        if padded > voxels:  # a grid smaller than a patch is padded to it whole
            device += padded * FLOAT32 * 2
        device += batch * math.prod(patch) * FLOAT32 * (2 + LIVE_FEATURE_MAPS * width)
    host = 0 if unsigned16 else inputs * 2  # a uint16 input takes the output in place
    return MemoryPlan(grid=grid, device_bytes=int(device), host_bytes=int(host))


def plan_for(
    pipeline: Any, shape: Shape3, unsigned16: bool, spacing: tuple[float, float, float]
) -> MemoryPlan:
    """:func:`plan_memory` for a :class:`fmc.pipeline.FusionPipeline` (its steps, sizes and networks)."""
    widths = [
        int(loaded.card.config.get("channels", [32])[0])
        for loaded in (pipeline.step1_model, pipeline.step2_model)
        if loaded is not None
    ]
    tiling = pipeline.config.tiling
    return plan_memory(
        shape,
        unsigned16,
        spacing,
        pipeline.config.target_spacing,
        global_size=pipeline.settings.global_size if pipeline.step1_model is not None else None,
        patch=tuple(tiling.patch) if pipeline.step2_model is not None else None,
        batch=int(tiling.batch),
        width=max(widths, default=1),
        dw=pipeline.settings.difference_weighting != "none",
    )


# ------------------------------------------------------------------------------------ what is there


def _meminfo_kib(key: str, path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_bytes_left() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _address_space_left() -> int | None:
    """What ``ulimit -v`` still allows this process to map."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _meminfo_kib("VmSize", "/proc/self/status")
    return max(0, soft - (mapped or 0) * 1024)


def host_bytes_available() -> int | None:
    """The host memory a case can still take: the least of free RAM, the cgroup's room and the
    address-space limit; None when none of them can be read."""
    free = _meminfo_kib("MemAvailable")
    candidates = [free * 1024 if free is not None else None, _cgroup_bytes_left(), _address_space_left()]
    known = [value for value in candidates if value is not None]
    return min(known) if known else None


def gpu_bytes_available(device: torch.device, cap_gib: float | None = None) -> int | None:
    """Free GPU memory plus what PyTorch holds cached, within ``--gpu-memory-gib``; None off CUDA."""
    if device.type != "cuda":
        return None
    try:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except Exception:  # a broken context: the attempt itself will say so
        return None
    available = free + cached
    if cap_gib is not None:
        available = min(available, int(cap_gib * GIB) - torch.cuda.memory_allocated(device))
    return max(0, available)


# ------------------------------------------------------------------------------------ the checks


def check_case(
    path: Path,
    shape: Shape3,
    spacing: tuple[float, float, float],
    plan: MemoryPlan,
    device: torch.device,
    gpu_cap_gib: float | None = None,
) -> None:
    """CaseError (one line naming the spacing and the grid it implies) when the case cannot be fused:
    a grid out of all proportion to the input, or a plan larger than the memory there is."""
    grid, voxels = plan.grid, math.prod(plan.grid)
    implies = (
        f"spacing {_spacing_text(spacing)} um implies a {_shape_text(grid)} grid at the method's "
        f"0.6 um ({_voxels_text(voxels)} voxels)"
    )
    growth = voxels / max(1, math.prod(shape))
    if growth > MAX_GRID_GROWTH:
        raise CaseError(
            path,
            f"{implies}, {growth:.0f}x the input's {_voxels_text(math.prod(shape))}: refused (at most "
            f"{MAX_GRID_GROWTH}x is fused); check the spacing metadata",
        )
    host = host_bytes_available()
    if device.type == "cuda":
        gpu = gpu_bytes_available(device, gpu_cap_gib)
        fits_gpu = gpu is None or plan.device_bytes <= gpu
        fits_cpu = host is None or plan.device_bytes + plan.host_bytes <= host
        if fits_gpu or fits_cpu:  # the CPU attempt (fmc.safeguards) takes what the GPU cannot
            return
        raise CaseError(
            path,
            f"{implies}: fusing it needs about {plan.device_bytes / GIB:.1f} GiB, more than the "
            f"{(gpu or 0) / GIB:.1f} GiB free on the GPU and the {(host or 0) / GIB:.1f} GiB of host "
            "memory available: refused before allocating",
        )
    needed = plan.device_bytes + plan.host_bytes
    if host is not None and needed > host:
        raise CaseError(
            path,
            f"{implies}: fusing it needs about {needed / GIB:.1f} GiB of memory, {host / GIB:.1f} GiB "
            "is available: refused before allocating",
        )
