"""Spacing-aware resampling between the native grid and the 0.6 um isotropic grid.

Why not plain ``F.interpolate``: downsampling a lightsheet stack (0.195 um -> 0.6 um is a
factor ~3 in y/x) aliases without a prefilter, and a whole-volume call allocates temporaries
that a study-5-sized case (1.1 G voxels) cannot afford next to the input and output.

The torch path writes each axis' resampling -- Gaussian prefilter (replicate boundary) followed
by linear interpolation with ``align_corners=False`` pixel centres, exactly PyTorch's trilinear
coordinate mapping -- as one banded matrix per axis and applies the three matrices as blocked
GEMMs. Output z-slabs take a contiguous band of input planes, so slabs reproduce the unchunked
result and the device only ever holds the input, the output and one slab of temporaries.

The SimpleITK path (:func:`resample_sitk`) is a multi-threaded CPU alternative with the same
geometry; it agrees with the torch path to ``SITK_TOLERANCE`` of the data range on smooth
data (its Gaussian is ITK's discrete Gaussian, not a sampled one, hence not bit-equal).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fmc.host_to_device import DeviceVolume
from fmc.method import TARGET_SPACING_UM

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]

TRUNCATE = 4.0  # Gaussian radius in sigmas, as scipy.ndimage / skimage
DEFAULT_CHUNK_VOXELS = 1 << 25  # 32 Mi voxels = 128 MiB per float32 slab temporary
BLOCK_ROWS = 64  # output rows per GEMM block along y and x: bounds the band, keeps GEMMs efficient
SITK_TOLERANCE = 1e-2  # max |sitk - torch| / data range on smooth data (measured <= 4e-3)


def isotropic_shape(
    shape: Sequence[int], spacing: Sequence[float], target: float = TARGET_SPACING_UM
) -> Shape3:
    """Grid size at ``target`` um per voxel covering the same physical extent (at least 1 voxel)."""
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"expected 3-D shape and spacing, got {tuple(shape)} and {tuple(spacing)}")
    if not target > 0:
        raise ValueError(f"target spacing must be positive, got {target}")
    out = []
    for n, s in zip(shape, spacing, strict=True):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"spacing must be finite and positive, got {tuple(spacing)}")
        out.append(max(1, round(int(n) * float(s) / target)))
    return (out[0], out[1], out[2])


def antialias_sigma(n_in: int, n_out: int) -> float:
    """Prefilter sigma in input voxels: (factor - 1) / 2 when downsampling, as skimage's anti_aliasing."""
    return max(0.0, (n_in / n_out - 1.0) / 2.0)


def _gaussian_taps(sigma: float) -> np.ndarray:
    radius = int(TRUNCATE * sigma + 0.5)
    if radius == 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


@functools.lru_cache(maxsize=8)  # a 1920 x 1242 operator is 19 MB
def _axis_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """Dense (n_out, n_in) float64 operator for one axis: Gaussian (replicate edges), then linear.

    Coordinates follow ``F.interpolate(..., align_corners=False)``: source = (i + 0.5) * n_in / n_out
    - 0.5, clamped at 0; the upper neighbour is clamped to the last voxel. Read-only (cached).
    """
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    g = _gaussian_taps(antialias_sigma(n_in, n_out)) if antialias else np.ones(1)
    radius = (len(g) - 1) // 2
    rows = np.arange(n_out)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for offset, weight in zip(range(-radius, radius + 1), g, strict=True):
        np.add.at(matrix, (rows, np.clip(i0 + offset, 0, n_in - 1)), (1.0 - lam) * weight)
        np.add.at(matrix, (rows, np.clip(i1 + offset, 0, n_in - 1)), lam * weight)
    matrix.setflags(write=False)
    return matrix


def _band(matrix: np.ndarray, o0: int, o1: int) -> tuple[int, int]:
    """Input index range [c0, c1) holding every nonzero weight of output rows [o0, o1)."""
    nonzero = np.nonzero(matrix[o0:o1].any(axis=0))[0]
    return int(nonzero[0]), int(nonzero[-1]) + 1


@dataclass
class _AxisOp:
    """One axis' banded operator, cut into (o0, o1, c0, c1, block) GEMM pieces on the device."""

    n_in: int
    n_out: int
    blocks: list[tuple[int, int, int, int, torch.Tensor]]

    @property
    def identity(self) -> bool:
        return self.n_in == self.n_out and not self.blocks

    def macs_per_line(self) -> int:
        return sum((o1 - o0) * (c1 - c0) for o0, o1, c0, c1, _ in self.blocks)


def _axis_op(n_in: int, n_out: int, antialias: bool, device: torch.device, block_rows: int) -> _AxisOp:
    if n_in == n_out:
        return _AxisOp(n_in, n_out, [])  # same size: linear and Gaussian are both the identity
    matrix = _axis_matrix(n_in, n_out, antialias)
    blocks = []
    for o0 in range(0, n_out, block_rows):
        o1 = min(o0 + block_rows, n_out)
        c0, c1 = _band(matrix, o0, o1)
        weights = torch.from_numpy(matrix[o0:o1, c0:c1].astype(np.float32)).to(device)
        blocks.append((o0, o1, c0, c1, weights))
    return _AxisOp(n_in, n_out, blocks)


def _apply_rows(x: torch.Tensor, op: _AxisOp) -> torch.Tensor:
    """Resample dim -2 of (N, A, B): out[:, o] = sum_c W[o, c] x[:, c]."""
    if op.identity:
        return x
    out = x.new_empty((x.shape[0], op.n_out, x.shape[2]))
    for o0, o1, c0, c1, weights in op.blocks:
        out[:, o0:o1] = torch.matmul(weights, x[:, c0:c1])
    return out


def _apply_cols(x: torch.Tensor, op: _AxisOp) -> torch.Tensor:
    """Resample dim -1 of (N, A, B): out[..., o] = sum_c x[..., c] W[o, c]."""
    if op.identity:
        return x
    out = x.new_empty((*x.shape[:-1], op.n_out))
    for o0, o1, c0, c1, weights in op.blocks:
        out[..., o0:o1] = torch.matmul(x[..., c0:c1], weights.T)
    return out


def _apply_yx(x: torch.Tensor, y_op: _AxisOp, x_op: _AxisOp) -> torch.Tensor:
    """Resample the two in-plane axes of (N, Y, X), in the order with fewer multiply-adds."""
    y_first = y_op.macs_per_line() * x.shape[2] + x_op.macs_per_line() * y_op.n_out
    x_first = x_op.macs_per_line() * x.shape[1] + y_op.macs_per_line() * x_op.n_out
    if y_first <= x_first:
        return _apply_cols(_apply_rows(x, y_op), x_op)
    return _apply_rows(_apply_cols(x, x_op), y_op)


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """TF32/bf16 matmul (if a caller enabled it for the networks) would cost ~1e-3 relative here."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class PlaneSource(Protocol):
    """A (Z, Y, X) volume that hands out float32 bands of planes, e.g.
    :class:`fmc.host_to_device.DeviceVolume`.

    Why: the input can stay in 16 bits on the device; only the band a slab needs is float32.
    """

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def device(self) -> torch.device: ...

    def planes(self, z0: int, z1: int) -> torch.Tensor:
        """Planes ``z0:z1`` as a float32 (z1 - z0, Y, X) tensor."""
        ...


def _check_shape(out_shape: Sequence[int]) -> Shape3:
    shape = tuple(int(n) for n in out_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"out_shape must be three positive sizes, got {tuple(out_shape)}")
    return (shape[0], shape[1], shape[2])


def resample_to_shape(
    volume: torch.Tensor | PlaneSource,
    out_shape: Sequence[int],
    *,
    antialias: bool = True,
    chunk_voxels: int | None = None,
) -> torch.Tensor:
    """Resample a (Z, Y, X) volume to ``out_shape`` on its own device (float32 out).

    Trilinear with ``align_corners=False`` (equal to ``F.interpolate`` to float rounding); with
    ``antialias`` each downsampled axis is first smoothed by a Gaussian of sigma (factor - 1) / 2
    input voxels (replicate edges). Work goes in output z-slabs of about ``chunk_voxels`` voxels per
    temporary (default 32 Mi), so memory is input + output + a few slabs. A non-float32 tensor
    is converted first (one extra copy); a :class:`PlaneSource` is read band by band instead.
    The input must be finite: a NaN spreads over its GEMM band.
    """
    out_shape = _check_shape(out_shape)
    if isinstance(volume, torch.Tensor) and tuple(volume.shape) == out_shape:
        return volume.to(torch.float32).clone()
    out = None
    for o0, slab in resample_slabs(volume, out_shape, antialias=antialias, chunk_voxels=chunk_voxels):
        if out is None:
            out = torch.empty(out_shape, dtype=torch.float32, device=slab.device)
        out[o0 : o0 + slab.shape[0]] = slab
    assert out is not None
    return out


def resample_slabs(
    volume: torch.Tensor | PlaneSource,
    out_shape: Sequence[int],
    *,
    antialias: bool = True,
    chunk_voxels: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The output of :func:`resample_to_shape` as consecutive z-slabs ``(first plane, slab)``.

    Why: a consumer that only needs one slab at a time (uint16 conversion, a file write) never
    holds the whole resampled volume; for study 5 that saves 4.6 GB of device memory. Slabs
    may be views of internal buffers: copy what must outlive the next iteration.
    """
    if isinstance(volume, torch.Tensor):
        if volume.dim() != 3:
            raise ValueError(f"volume must be 3-D (Z, Y, X), got shape {tuple(volume.shape)}")
        source: PlaneSource = DeviceVolume(volume.to(torch.float32).contiguous(), unsigned16=False)
    elif hasattr(volume, "planes"):
        source = volume
    else:
        raise TypeError(f"volume must be a torch.Tensor or a PlaneSource, got {type(volume).__name__}")
    if min(source.shape) < 1:
        raise ValueError(f"volume is empty: shape {tuple(source.shape)}")
    out_shape = _check_shape(out_shape)
    chunk = DEFAULT_CHUNK_VOXELS if chunk_voxels is None else int(chunk_voxels)
    if chunk < 1:
        raise ValueError(f"chunk_voxels must be positive, got {chunk_voxels}")

    zi, yi, xi = source.shape
    zo, yo, xo = out_shape
    device = source.device
    y_op = _axis_op(yi, yo, antialias, device, BLOCK_ROWS)
    x_op = _axis_op(xi, xo, antialias, device, BLOCK_ROWS)
    plane = max(yi * xi, yo * xo)
    rows = max(1, int(chunk // (plane * max(1.0, zi / zo))))
    # z-slabs are the z operator's blocks, all uploaded before the loop (no host sync per slab).
    z_op = _axis_op(zi, zo, antialias, device, rows)
    # Planes first when that shrinks them, or when z grows (fewer planes to treat before z).
    yx_first = yo * xo < yi * xi or zo > zi

    if z_op.identity:
        for o0 in range(0, zo, rows):
            with _full_fp32_matmul():
                slab = _apply_yx(source.planes(o0, min(o0 + rows, zo)), y_op, x_op)
            yield o0, slab
        return
    for o0, o1, c0, c1, weights in z_op.blocks:
        with _full_fp32_matmul():
            band = source.planes(c0, c1)
            if yx_first:
                planes = _apply_yx(band, y_op, x_op)
                slab = torch.matmul(weights, planes.reshape(c1 - c0, -1)).view(o1 - o0, yo, xo)
            else:
                mixed = torch.matmul(weights, band.reshape(c1 - c0, -1)).view(o1 - o0, yi, xi)
                slab = _apply_yx(mixed, y_op, x_op)
            del band
        yield o0, slab


class RegionResampler:
    """Any box of ``resample_to_shape(volume, out_shape)`` without computing the rest.

    Why: step 2 needs the step-1 output at 0.6 um only one patch at a time. Upsampling the
    224^3 prediction per patch instead of to the full grid saves one volume of device memory
    (3.2 GB for study 5) for a few small matrix products per patch.
    """

    def __init__(self, volume: torch.Tensor, out_shape: Sequence[int], *, antialias: bool = True) -> None:
        if not isinstance(volume, torch.Tensor) or volume.dim() != 3 or min(volume.shape) < 1:
            raise ValueError("volume must be a non-empty 3-D (Z, Y, X) tensor")
        self.volume = volume.to(torch.float32).contiguous()
        self.shape = _check_shape(out_shape)
        self._axes: list[tuple[torch.Tensor, np.ndarray, np.ndarray] | None] = []
        for n_in, n_out in zip(self.volume.shape, self.shape, strict=True):
            if n_in == n_out:
                self._axes.append(None)  # identity axis: a plain slice
                continue
            matrix = _axis_matrix(int(n_in), n_out, antialias)
            nonzero = matrix != 0
            first = nonzero.argmax(axis=1)
            last = n_in - 1 - nonzero[:, ::-1].argmax(axis=1)
            weights = torch.from_numpy(matrix.astype(np.float32)).to(self.volume.device)
            self._axes.append((weights, first, last))

    def region(self, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """The (size) box at ``start`` of the resampled volume, float32 on the volume's device."""
        out = self.volume
        for axis, (s, n) in enumerate(zip(start, size, strict=True)):
            if not (s >= 0 and n >= 1 and s + n <= self.shape[axis]):
                raise ValueError(f"box {tuple(start)}+{tuple(size)} leaves the grid {self.shape}")
            op = self._axes[axis]
            if op is None:
                out = out.narrow(axis, s, n)
                continue
            weights, first, last = op
            c0, c1 = int(first[s : s + n].min()), int(last[s : s + n].max()) + 1
            band = weights[s : s + n, c0:c1]
            with _full_fp32_matmul():
                moved = torch.tensordot(band, out.narrow(axis, c0, c1 - c0), dims=([1], [axis]))
            out = moved.movedim(0, axis)
        return out.contiguous()


def resample_sitk(volume: np.ndarray, out_shape: Sequence[int], *, antialias: bool = True) -> np.ndarray:
    """CPU resampling with SimpleITK (multi-threaded); same geometry as :func:`resample_to_shape`.

    The input gets spacing 1 and the output spacing n_in / n_out per axis with the origin shifted by
    half a voxel difference, so both grids span the same extent with pixel centres as in
    ``align_corners=False``. Downsampled axes get ITK's DiscreteGaussian (variance sigma^2,
    zero-flux edges) first. Agrees with the torch path within ``SITK_TOLERANCE`` of the range.
    """
    import SimpleITK as sitk  # noqa: N813 -- imported lazily: only the CPU alternative needs it

    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"volume must be 3-D (Z, Y, X), got shape {array.shape}")
    out_shape = _check_shape(out_shape)
    if tuple(array.shape) == out_shape:
        return array.astype(np.float32, copy=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    # SimpleITK orders axes (x, y, z); numpy is (z, y, x).
    n_in = array.shape[::-1]
    n_out = out_shape[::-1]
    scale = [float(i) / float(o) for i, o in zip(n_in, n_out, strict=True)]
    if antialias:
        variance = [antialias_sigma(i, o) ** 2 for i, o in zip(n_in, n_out, strict=True)]
        if any(v > 0 for v in variance):
            smoother = sitk.DiscreteGaussianImageFilter()
            smoother.SetVariance(variance)
            smoother.SetUseImageSpacing(False)
            smoother.SetMaximumError(1e-3)
            smoother.SetMaximumKernelWidth(1024)
            image = smoother.Execute(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in n_out])
    resampler.SetOutputSpacing(scale)
    resampler.SetOutputOrigin([0.5 * (s - 1.0) for s in scale])
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    result = resampler.Execute(image)
    return sitk.GetArrayFromImage(result).astype(np.float32, copy=False)
