"""How the native input enters the output: smoothed in plane, its sub-0.6 um detail kept by a gain per case.

Why: the output is the native input plus the change the networks made at 0.6 um
(:func:`fmc.pipeline.add_change_on_native_grid`), so the input's detail finer than 0.6 um (its
"high band" ``H = N - up(down(N))``) passes through untouched. In a clean view that band is
structure and must be kept; in a noisy one it is mostly noise, and the 0.6 um round trip, which
drops it, scores better (measured on held-out validation pairs: from -0.64 to +0.45 N_SSIM for
the round trip against the input, case by case). So the band is scaled by a Wiener-like gain

    g = clip(native_detail - noise_weight * rho, 0, 1),   rho = noise power in H / power of H,

where the noise power comes from the view itself: the mean squared pseudo-residual
``(2 x_i - x_{i-1} - x_{i+1}) / sqrt(6)`` along y and x (the variance of white noise on a locally
linear signal; structure adds to it, so rho errs towards dropping detail), times the share of
white noise that survives into the high band, measured by sending white noise through the same
round trip. ``noise_weight`` 0 gives the fixed share ``native_detail`` (1: the input's detail,
untouched). Before that, the native input may be smoothed in plane by a small Gaussian
(``detail_sigma`` voxels: a view's noise is white per pixel); the band is then that smoothed
input minus the round trip, and the noise share is measured through the same two operations.
The card's values are fitted on validation pairs (:mod:`fmc.training.safeguard_fit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmc.resample import isotropic_shape, resample_slabs, resample_to_shape

#: Largest white-noise probe (Z, Y, X): enough voxels for a steady figure, little time.
PROBE_SHAPE = (16, 160, 160)


@dataclass(frozen=True)
class NativeDetail:
    """What one case's output takes from its native input: ``smooth(N) * gain + up(I) * (1 - gain)``."""

    sigma: float = 0.0  # in-plane Gaussian sigma (input voxels) applied to the native input
    gain: float = 1.0  # share of the (smoothed) input's detail finer than the 0.6 um grid kept


def smooth_in_plane(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur along y and x of (Z, Y, X) planes (reflected borders); ``sigma`` 0: the planes.

    A weighted sum of shifted views, one axis at a time: on a CPU this ran 5x faster than a
    1-channel ``conv2d`` with the same taps.
    """
    if sigma <= 0:
        return planes
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = (weights / weights.sum()).tolist()
    out = planes
    for dim in (1, 2):
        size = out.shape[dim]
        if size <= radius:
            continue  # too thin to reflect: leave that axis
        pad = (radius, radius, 0, 0) if dim == 2 else (0, 0, radius, radius)
        padded = F.pad(out[None], pad, mode="reflect")[0]
        total = padded.narrow(dim, 0, size) * weights[0]
        for k in range(1, 2 * radius + 1):
            total.add_(padded.narrow(dim, k, size), alpha=weights[k])
        out = total
    return out


def normalized_planes(
    volume: np.ndarray, z0: int, z1: int, bounds: tuple[float, float], device: torch.device
) -> torch.Tensor:
    """Planes ``z0:z1`` of the native input on ``device``, normalized by the case's (p2, p99.8)
    ``bounds`` as float32: a copy, so the input stays as it is."""
    lo, hi = bounds
    planes = torch.from_numpy(np.array(volume[z0:z1], dtype=np.float32)).to(device)
    return planes.sub_(lo).div_(hi - lo if hi > lo else 1.0)


def pseudo_residual_power(planes: torch.Tensor) -> float:
    """Mean squared pseudo-residual along y and x of (Z, Y, X) planes: white noise's variance."""
    if planes.shape[1] < 3 or planes.shape[2] < 3:
        return 0.0
    rx = (2 * planes[:, :, 1:-1] - planes[:, :, :-2] - planes[:, :, 2:]) / math.sqrt(6.0)
    ry = (2 * planes[:, 1:-1, :] - planes[:, :-2, :] - planes[:, 2:, :]) / math.sqrt(6.0)
    return 0.5 * (float(rx.square().mean()) + float(ry.square().mean()))


def high_band_noise_share(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    target_spacing: float,
    sigma: float = 0.0,
) -> float:
    """The share of white noise's variance left in ``smooth(N) - up(down(N))`` for this grid
    (seeded, so the same grid gives the same figure)."""
    probe = tuple(min(n, p) for n, p in zip(shape, PROBE_SHAPE, strict=True))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(probe, generator=generator)
    small = resample_to_shape(noise, isotropic_shape(probe, spacing, target_spacing))
    back = resample_to_shape(small, probe)
    return float((smooth_in_plane(noise, sigma) - back).square().mean())


def plan_native_detail(
    volume: np.ndarray,
    iso: torch.Tensor,
    bounds: tuple[float, float],
    spacing: tuple[float, float, float],
    target_spacing: float,
    native_detail: float,
    noise_weight: float,
    sigma: float = 0.0,
) -> NativeDetail:
    """The case's smoothing and gain (module docstring); the gain is ``native_detail`` when
    ``noise_weight`` is 0, without reading the volume."""
    if noise_weight == 0:
        return NativeDetail(sigma, float(native_detail))
    z, y, x = volume.shape
    shape = (int(z), int(y), int(x))
    band_power, noise_power, voxels = 0.0, 0.0, 0
    for z0, round_trip in resample_slabs(iso, shape):
        native = normalized_planes(volume, z0, z0 + round_trip.shape[0], bounds, round_trip.device)
        count = native.numel()
        band_power += float((smooth_in_plane(native, sigma) - round_trip).square().mean()) * count
        noise_power += pseudo_residual_power(native) * count
        voxels += count
    if voxels == 0 or band_power <= 0:
        return NativeDetail(sigma, float(native_detail))
    share = high_band_noise_share(shape, spacing, target_spacing, sigma)
    rho = share * noise_power / band_power
    return NativeDetail(sigma, float(min(1.0, max(0.0, native_detail - noise_weight * rho))))
