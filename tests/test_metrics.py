"""fmc.metrics: SSIM definition vs skimage, back-end agreement, N_SSIM anchors, proxy IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

from fmc import metrics
from fmc.normalization import percentile_normalize


def smooth_noise(shape: tuple[int, int, int], seed: int, sigma: float = 2.0) -> np.ndarray:
    """Random but spatially structured volume in [0, 1] (float64)."""
    v = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (v - v.min()) / (v.max() - v.min())


def raw_triplet(shape: tuple[int, int, int] = (20, 26, 30)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred, gt, input) as uint16 volumes, input further from gt than pred."""
    gt = smooth_noise(shape, 0)
    noise = smooth_noise(shape, 1, sigma=0.7) - 0.5

    def to_u16(v: np.ndarray) -> np.ndarray:
        return np.clip(v * 40000 + 500, 0, 65535).astype(np.uint16)

    return to_u16(gt + 0.15 * noise), to_u16(gt), to_u16(gt + 0.5 * noise)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    a = smooth_noise((24, 32, 40), 0)
    b = np.clip(a + 0.3 * (smooth_noise((24, 32, 40), 1, sigma=1.0) - 0.5), 0, None)
    return a, b


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
    )


def test_window_constants_match_skimage() -> None:
    assert metrics.SSIM_RADIUS == 5 and metrics.SSIM_WIN_SIZE == 11
    impulse = np.zeros(11)
    impulse[5] = 1
    np.testing.assert_allclose(metrics._KERNEL, ndi.gaussian_filter1d(impulse, 1.5, truncate=3.5), atol=1e-15)


@pytest.mark.parametrize("block", [None, (3, 5), (1, 1)])
def test_ssim_scipy_matches_skimage(
    pair: tuple[np.ndarray, np.ndarray], block: tuple[int, int] | None
) -> None:
    a, b = pair
    ref = skimage_ssim(a, b)
    assert 0.3 < ref < 0.99  # the test volume is neither trivial nor unrelated
    assert metrics.ssim3d(a, b, device="scipy", block=block) == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("block", [None, (4, 6), (1, 2)])
def test_ssim_torch_matches_scipy(pair: tuple[np.ndarray, np.ndarray], block: tuple[int, int] | None) -> None:
    a, b = pair
    cpu = metrics.ssim3d(a, b, device="scipy")
    assert metrics.ssim3d(a, b, device="cpu", block=block) == pytest.approx(cpu, abs=1e-4)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert metrics.ssim3d(ta, tb, device="cpu", block=block) == pytest.approx(cpu, abs=1e-4)


def test_ssim_of_identical_volumes_is_one(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = pair
    assert metrics.ssim3d(a, a, device="scipy") == pytest.approx(1.0, abs=1e-6)


def test_ssim_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="mismatch"):
        metrics.ssim3d(np.zeros((12, 12, 12)), np.zeros((12, 12, 13)))
    with pytest.raises(ValueError, match=">= 11"):
        metrics.ssim3d(np.zeros((10, 20, 20)), np.zeros((10, 20, 20)))
    with pytest.raises(ValueError, match="3-D"):
        metrics.ssim3d(np.zeros((20, 20)), np.zeros((20, 20)))


@pytest.mark.parametrize("device", ["scipy", "cpu"])
def test_n_ssim_identity_is_zero_and_target_is_one(device: str) -> None:
    pred, gt, inp = raw_triplet()
    assert metrics.n_ssim(inp, gt, inp, device=device) == 0.0
    assert metrics.n_ssim(gt, gt, inp, device=device) == pytest.approx(1.0, abs=1e-5)
    score = metrics.n_ssim(pred, gt, inp, device=device)
    assert 0.05 < score < 0.95


def test_n_ssim_matches_definition_with_skimage() -> None:
    pred, gt, inp = raw_triplet()
    norm = [percentile_normalize(v).astype(np.float64) for v in (pred, gt, inp)]
    s_pred, s_inp = skimage_ssim(norm[0], norm[1]), skimage_ssim(norm[2], norm[1])
    expected = (s_pred - s_inp) / (1 - s_inp)
    scores = metrics.ssim_scores(pred, gt, inp, device="scipy", block=(2, 3))
    assert scores.ssim_pred == pytest.approx(s_pred, abs=1e-4)
    assert scores.ssim_input == pytest.approx(s_inp, abs=1e-4)
    assert scores.n_ssim == pytest.approx(expected, abs=1e-4)
    assert metrics.n_ssim(pred, gt, inp) == pytest.approx(expected, abs=1e-4)


def test_n_ssim_torch_path_equals_scipy_path_on_raw_volumes() -> None:
    pred, gt, inp = raw_triplet()
    ref = metrics.ssim_scores(pred, gt, inp, device="scipy")
    got = metrics.ssim_scores(pred, gt, inp, device="cpu", block=(3, 4))
    assert got.ssim_pred == pytest.approx(ref.ssim_pred, abs=1e-4)
    assert got.ssim_input == pytest.approx(ref.ssim_input, abs=1e-4)
    tensors = [torch.from_numpy(v.astype(np.int32)) for v in (pred, gt, inp)]
    assert metrics.n_ssim(*tensors, device="cpu") == pytest.approx(ref.n_ssim, abs=1e-4)


def test_normalized_gain_undefined_when_input_is_perfect() -> None:
    assert math.isnan(metrics.normalized_gain(1.0, 1.0))
    assert metrics.normalized_gain(0.75, 0.5) == pytest.approx(0.5)


def test_otsu_threshold_matches_skimage() -> None:
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(m, 1.0, 5000) for m in (2.0, 9.0)]).reshape(10, 10, 100)
    assert metrics.otsu_threshold(x) == pytest.approx(threshold_otsu(x), rel=1e-9)


def test_proxy_iou_identical_disjoint_and_partial() -> None:
    a = np.zeros((16, 16, 16), np.uint16)
    b = np.zeros_like(a)
    c = np.zeros_like(a)
    a[:, :, :8] = 1000
    b[:, :, 8:] = 1000
    c[:, :, 4:12] = 1000
    assert metrics.proxy_iou(a, a) == 1.0
    assert metrics.proxy_iou(a, b) == 0.0
    assert metrics.proxy_iou(a, c) == pytest.approx(4 / 12)


def test_n_iou_proxy_identity_and_target() -> None:
    _, gt, inp = raw_triplet()
    assert metrics.n_iou_proxy(inp, gt, inp) == 0.0
    assert metrics.n_iou_proxy(gt, gt, inp) == 1.0


@pytest.mark.parametrize(("channel", "sigma"), [("nucleus", 0.442), ("membrane", 0.5), ("unknown", 0.5)])
def test_gaussian_baseline_sigma_per_channel(channel: str, sigma: float) -> None:
    _, _, inp = raw_triplet((12, 14, 16))
    out = metrics.gaussian_baseline(inp, channel)
    assert out.dtype == np.float32 and out.shape == inp.shape
    np.testing.assert_allclose(out, ndi.gaussian_filter(inp.astype(np.float64), sigma), rtol=1e-5)


def test_ssim_against_is_the_prediction_term_of_n_ssim_to_the_last_bit():
    """The quality table scores every row from one SSIM(input, gt) per case: the same N_SSIM."""
    rng = np.random.default_rng(0)
    gt = (rng.random((24, 40, 40)) * 1000).astype(np.uint16)
    inp = (gt * 0.7 + rng.random(gt.shape) * 300).astype(np.uint16)
    pred = (gt * 0.9 + rng.random(gt.shape) * 100).astype(np.uint16)
    per_row = metrics.normalized_gain(metrics.ssim_against(pred, gt), metrics.ssim_against(inp, gt))
    assert per_row == metrics.n_ssim(pred, gt, inp)
