"""How much of the input's own detail finer than the 0.6 um grid the output keeps: one gain per case.

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
untouched). The card's value of ``noise_weight`` is fitted on validation pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fmc.resample import isotropic_shape, resample_slabs, resample_to_shape

#: Largest white-noise probe (Z, Y, X): enough voxels for a steady figure, little time.
PROBE_SHAPE = (16, 160, 160)


def pseudo_residual_power(planes: torch.Tensor) -> float:
    """Mean squared pseudo-residual along y and x of (Z, Y, X) planes: white noise's variance."""
    if planes.shape[1] < 3 or planes.shape[2] < 3:
        return 0.0
    rx = (2 * planes[:, :, 1:-1] - planes[:, :, :-2] - planes[:, :, 2:]) / math.sqrt(6.0)
    ry = (2 * planes[:, 1:-1, :] - planes[:, :-2, :] - planes[:, 2:, :]) / math.sqrt(6.0)
    return 0.5 * (float(rx.square().mean()) + float(ry.square().mean()))


def high_band_noise_share(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target_spacing: float
) -> float:
    """The share of white noise's variance left in ``N - up(down(N))`` for this grid (seeded, so
    the same grid gives the same figure)."""
    probe = tuple(min(n, p) for n, p in zip(shape, PROBE_SHAPE, strict=True))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(probe, generator=generator)
    small = resample_to_shape(noise, isotropic_shape(probe, spacing, target_spacing))
    back = resample_to_shape(small, probe)
    return float((noise - back).square().mean())


def native_detail_gain(
    volume: np.ndarray,
    iso: torch.Tensor,
    bounds: tuple[float, float],
    spacing: tuple[float, float, float],
    target_spacing: float,
    native_detail: float,
    noise_weight: float,
) -> float:
    """The case's gain g on its high band (module docstring); ``native_detail`` when
    ``noise_weight`` is 0, without reading the volume."""
    if noise_weight == 0:
        return float(native_detail)
    lo, hi = bounds
    span = hi - lo if hi > lo else 1.0
    shape = tuple(int(n) for n in volume.shape)
    band_power, noise_power, voxels = 0.0, 0.0, 0
    for z0, round_trip in resample_slabs(iso, shape):
        z1 = z0 + round_trip.shape[0]
        native = torch.from_numpy(np.array(volume[z0:z1], dtype=np.float32)).to(round_trip.device)
        native.sub_(lo).div_(span)
        count = native.numel()
        band_power += float((native - round_trip).square().mean()) * count
        noise_power += pseudo_residual_power(native) * count
        voxels += count
    if voxels == 0 or band_power <= 0:
        return float(native_detail)
    share = high_band_noise_share(shape, spacing, target_spacing)  # type: ignore[arg-type]
    rho = share * noise_power / band_power
    return float(min(1.0, max(0.0, native_detail - noise_weight * rho)))
