"""The per-case share of the input's sub-0.6 um detail: noise drops it, structure keeps it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fmc.native_detail import (
    high_band_noise_share,
    plan_native_detail,
    pseudo_residual_power,
    smooth_in_plane,
)
from fmc.resample import isotropic_shape, resample_to_shape

SPACING = (1.0, 0.2, 0.2)


def test_pseudo_residuals_measure_white_noise_and_ignore_a_ramp():
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.normal(0, 0.1, (8, 64, 64)).astype(np.float32))
    assert pseudo_residual_power(noise) == pytest.approx(0.01, rel=0.05)
    ramp = torch.arange(64, dtype=torch.float32).expand(8, 64, 64).contiguous()
    assert pseudo_residual_power(ramp) == pytest.approx(0.0, abs=1e-6)


def test_finer_pixels_leave_more_noise_in_the_high_band():
    fine = high_band_noise_share((16, 96, 96), (1.0, 0.195, 0.195), 0.6)
    coarse = high_band_noise_share((16, 96, 96), (1.0, 0.39, 0.39), 0.6)
    assert 0.0 < coarse < fine < 1.0


def _case(noise_sd: float) -> tuple[np.ndarray, torch.Tensor, tuple[float, float]]:
    """Fine structure (blurred sparse points) plus white noise, as uint16, with its 0.6 um volume."""
    rng = np.random.default_rng(1)
    points = (rng.random((16, 96, 96)) < 0.01).astype(np.float32)
    signal = ndimage.gaussian_filter(points, (0.5, 1.2, 1.2)) * 4000 + 200
    volume = np.clip(signal + rng.normal(0, noise_sd, signal.shape), 0, 65535).astype(np.uint16)
    lo, hi = np.percentile(volume, [2, 99.8])
    raw = torch.from_numpy(volume.astype(np.float32))
    iso = resample_to_shape(raw, isotropic_shape(volume.shape, SPACING, 0.6)).sub_(lo).div_(hi - lo)
    return volume, iso, (float(lo), float(hi))


def test_noise_lowers_the_share_of_detail_kept_and_a_clean_view_keeps_it():
    clean = plan_native_detail(*_case(2.0), SPACING, 0.6, native_detail=1.0, noise_weight=1.0).gain
    noisy = plan_native_detail(*_case(400.0), SPACING, 0.6, native_detail=1.0, noise_weight=1.0).gain
    assert clean > 0.6 and noisy < 0.4 and 0.0 <= noisy < clean <= 1.0
    # smoothing first removes noise from the band, so more of it is kept
    smoothed = plan_native_detail(*_case(400.0), SPACING, 0.6, 1.0, 1.0, sigma=1.0)
    assert smoothed.sigma == 1.0 and smoothed.gain > noisy


def test_a_zero_noise_weight_keeps_the_fixed_share():
    volume, iso, bounds = _case(400.0)
    assert (
        plan_native_detail(volume, iso, bounds, SPACING, 0.6, native_detail=0.7, noise_weight=0.0).gain == 0.7
    )


def test_in_plane_smoothing_keeps_the_mean_and_lowers_pixel_noise():
    rng = np.random.default_rng(2)
    planes = torch.from_numpy(rng.normal(1.0, 0.2, (4, 48, 48)).astype(np.float32))
    smoothed = smooth_in_plane(planes, 1.0)
    assert smoothed.shape == planes.shape
    assert float(smoothed.mean()) == pytest.approx(float(planes.mean()), abs=0.01)
    assert float(smoothed.std()) < 0.5 * float(planes.std())
    assert smooth_in_plane(planes, 0.0) is planes
