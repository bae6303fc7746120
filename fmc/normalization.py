"""Percentile normalization and the uint16 mappings: a step of the method, used by evaluation too.

Every volume is mapped by its own (p2, p99.8) percentiles, ``(x - p2) / (p99.8 - p2)``, the
challenge's normalization (docs/task.md, Metric): the pipeline does it before step 1 and maps the
prediction back into the input's range at the end (:func:`to_input_range_uint16`); the metric
does it to every volume it scores; training caches normalized volumes. Writing a float volume
as uint16 (:func:`clip_to_uint16`) is the other mapping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmc.memory import SLAB_VOXELS, z_slabs

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

PERCENTILE_LOW = 2.0
PERCENTILE_HIGH = 99.8
#: What a model card records about the normalization its network was trained with.
CARD_NORMALIZATION = {"method": "percentile", "low": PERCENTILE_LOW, "high": PERCENTILE_HIGH}
#: numpy float volumes above this size get percentiles from a regular, deterministic subsample.
NUMPY_EXACT_PERCENTILE_MAX = 50_000_000
#: torch volumes above this size get percentiles from a regular subsample (kthvalue on <= this many).
TORCH_EXACT_PERCENTILE_MAX = 16_000_000
UINT16_MAX = 65535


def _numpy_int_percentiles(x: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Exact np.percentile (linear method) for <=16-bit integers via a chunked histogram.

    Avoids np.percentile's full float64 copy and partition of a 1 G-voxel volume.
    """
    info = np.iinfo(x.dtype)
    offset = -int(info.min)
    flat = x.reshape(-1)
    counts = np.zeros(int(info.max) + offset + 1, dtype=np.int64)
    for start in range(0, flat.size, SLAB_VOXELS):
        chunk = flat[start : start + SLAB_VOXELS]
        if offset:
            chunk = chunk.astype(np.int32) + offset
        counts += np.bincount(chunk, minlength=counts.size)
    return percentiles_from_counts(counts, offset, qs)


def percentiles_from_counts(counts: np.ndarray, offset: int, qs: Sequence[float]) -> list[float]:
    """np.percentile's linear method from a histogram: ``counts[i]`` voxels hold the value ``i - offset``."""
    cum = np.cumsum(counts)
    n = int(cum[-1])

    def order_stat(k: int) -> float:  # k-th smallest value, 0-based
        return float(np.searchsorted(cum, k, side="right") - offset)

    out = []
    for q in qs:
        h = (n - 1) * q / 100.0
        k = math.floor(h)
        lo = order_stat(k)
        hi = order_stat(min(k + 1, n - 1))
        out.append(lo + (h - k) * (hi - lo))
    return out


def _numpy_percentiles(x: np.ndarray, qs: Sequence[float]) -> list[float]:
    if x.size == 0:
        raise ValueError("empty array has no percentiles")
    if x.dtype.kind in "ui" and x.dtype.itemsize <= 2:
        return _numpy_int_percentiles(x, qs)
    flat = x.reshape(-1)
    if flat.size > NUMPY_EXACT_PERCENTILE_MAX:
        step = math.ceil(flat.size / NUMPY_EXACT_PERCENTILE_MAX)
        flat = flat[::step]
    return [float(v) for v in np.percentile(flat, list(qs))]


def _torch_percentiles(x: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolated percentiles with kthvalue (torch.quantile refuses > 16 M elements)."""
    flat = x.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("empty tensor has no percentiles")
    if flat.numel() > TORCH_EXACT_PERCENTILE_MAX:
        step = math.ceil(flat.numel() / TORCH_EXACT_PERCENTILE_MAX)
        flat = flat[::step]
    flat = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    n = flat.numel()
    out = []
    for q in qs:
        h = (n - 1) * q / 100.0
        k = math.floor(h)
        lo = float(torch.kthvalue(flat, k + 1).values)
        hi = float(torch.kthvalue(flat, min(k + 2, n)).values)
        out.append(lo + (h - k) * (hi - lo))
    return out


def percentile_bounds(
    x: ArrayLike, low: float = PERCENTILE_LOW, high: float = PERCENTILE_HIGH
) -> tuple[float, float]:
    """(p_low, p_high) of a volume, as np.percentile's linear method.

    Exact for numpy integer volumes of <= 16 bits (chunked histogram, any size) and for other
    volumes up to 50 M (numpy) / 16 M (torch) voxels; larger ones use every k-th voxel
    (deterministic) so the cost stays bounded.
    """
    if isinstance(x, torch.Tensor):
        lo, hi = _torch_percentiles(x, (low, high))
    else:
        lo, hi = _numpy_percentiles(np.asarray(x), (low, high))
    return lo, hi


@dataclass(frozen=True)
class VolumeNorm:
    """Affine map ``(x - lo) / scale``; ``scale == 0`` means a constant volume, mapped to zeros."""

    lo: float = 0.0
    scale: float = 1.0


def norm_of(x: ArrayLike, low: float, high: float) -> VolumeNorm:
    lo, hi = percentile_bounds(x, low, high)
    scale = hi - lo
    if not (scale > 0 and math.isfinite(scale)):
        log.warning("constant volume (p%g == p%g == %g): normalized to zeros", low, high, lo)
        return VolumeNorm(0.0, 0.0)
    return VolumeNorm(lo, scale)


def apply_norm_numpy(x: np.ndarray, norm: VolumeNorm | None) -> np.ndarray:
    out = x.astype(np.float32, copy=True)
    if norm is None:
        return out
    if norm.scale == 0:
        out[...] = 0
        return out
    out -= np.float32(norm.lo)
    out /= np.float32(norm.scale)
    return out


def apply_norm_torch(x: torch.Tensor, norm: VolumeNorm | None) -> torch.Tensor:
    out = x.to(torch.float32)
    if out.data_ptr() == x.data_ptr():
        out = out.clone()
    if norm is None:
        return out
    if norm.scale == 0:
        return out.zero_()
    return out.sub_(norm.lo).div_(norm.scale)


def percentile_normalize(
    x: ArrayLike, low: float = PERCENTILE_LOW, high: float = PERCENTILE_HIGH
) -> ArrayLike:
    """``(x - p_low) / (p_high - p_low)`` as float32, numpy in -> numpy out, torch in -> torch out.

    This is the challenge's normalization (no clipping). A constant volume (zero denominator)
    becomes zeros instead of NaN/Inf, with a warning.
    """
    norm = norm_of(x, low, high)
    if isinstance(x, torch.Tensor):
        return apply_norm_torch(x, norm)
    return apply_norm_numpy(np.asarray(x), norm)


# --------------------------------------------------------------------------- uint16


def to_input_range_uint16(slab: torch.Tensor, low: float, high: float) -> np.ndarray:
    """Map a normalized prediction slab back to the input's (p2, p99.8) range; clip, round, uint16.

    Converted on the device, so the copy to the host moves 2 bytes per voxel, not 4. The
    device side uses int16 (offset by 32768), which every backend can cast to; on the host
    flipping the top bit turns those bits into the uint16 value.
    """
    scale = high - low if high > low else 1.0
    part = (slab * scale + low).clamp_(0, UINT16_MAX).round_().sub_(32768)
    bits = part.to(torch.int16).cpu().numpy().view(np.uint16)
    bits ^= np.uint16(0x8000)
    return bits


def clip_to_uint16(volume: np.ndarray) -> np.ndarray:
    """uint16 copy of ``volume`` (clipped, rounded, NaN -> 0), converted slab by slab."""
    volume = np.asarray(volume)
    if volume.dtype == np.uint16:
        return np.ascontiguousarray(volume)
    if volume.dtype.kind not in "buif":
        raise TypeError(f"cannot write a {volume.dtype} volume as uint16")
    out = np.empty(volume.shape, dtype=np.uint16)
    if volume.ndim == 0 or volume.size == 0:
        return out
    for zs in z_slabs(volume):
        slab = volume[zs]
        if slab.dtype.kind == "f":
            slab = np.nan_to_num(slab, nan=0.0, posinf=float(UINT16_MAX), neginf=0.0)
            np.clip(slab, 0, UINT16_MAX, out=slab)
            np.rint(slab, out=slab)
        elif slab.dtype.kind in "iu":
            slab = np.clip(slab, 0, UINT16_MAX)
        out[zs] = slab
    return out
