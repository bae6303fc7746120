"""FuseMyCells evaluation metrics: 3-D SSIM, N_SSIM and a proxy N_IoU (normalization: fmc.normalization).

The challenge's evaluation code is not public; this module fixes one explicit definition
(see :func:`ssim3d`) that matches ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`` on 3-D volumes.

Two SSIM back ends give the same number (to ~1e-6, tested to 1e-4):

* ``scipy``: ``scipy.ndimage.correlate1d`` in float32 on blocks of the volume, run on a
  thread pool (ndimage releases the GIL), used by default when no CUDA device exists;
* ``torch``: the same separable Gaussian as symmetric shift-and-add passes on any torch
  device, used by default when CUDA is available or whenever a torch device is named.

Both stream over z/y blocks (with a halo of the kernel radius), so memory is a few blocks,
never a full-volume float copy: a study-5-sized volume is scored with the raw inputs plus
O(block) working memory.

Cellpose weights cannot be fetched here, so the IoU term uses Otsu masks instead of Cellpose
segmentations; every name and label says "proxy".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch

from fmc.memory import SLAB_VOXELS
from fmc.normalization import (
    PERCENTILE_HIGH,
    PERCENTILE_LOW,
    VolumeNorm,
    apply_norm_numpy,
    apply_norm_torch,
    norm_of,
)

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
Device = str | torch.device | None

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 1.0
#: Gaussian radius as scipy.ndimage computes it: int(truncate * sigma + 0.5) = 5.
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
#: skimage's win_size for gaussian weights (2 * radius + 1 = 11); it crops (win_size - 1) // 2.
SSIM_WIN_SIZE = 2 * SSIM_RADIUS + 1
#: Baseline Gaussian sigmas (voxels) per channel; unknown channels use the membrane value.
BASELINE_SIGMA = {"nucleus": 0.442, "membrane": 0.5}
BASELINE_SIGMA_DEFAULT = 0.5

_TORCH_BLOCK_VOXELS = 1 << 26  # input voxels per block and map, torch back end
_SCIPY_BLOCK_Z = 32
_SSIM_CHUNK_VOXELS = 1 << 20  # voxels per elementwise chunk of the SSIM map (CPU cache sized)
_TORCH_BLOCK_Z = 64


def _gaussian_kernel() -> np.ndarray:
    """The 11-tap kernel scipy.ndimage.gaussian_filter uses for sigma 1.5, truncate 3.5 (float64)."""
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    phi = np.exp(-0.5 / SSIM_SIGMA**2 * x**2)
    return phi / phi.sum()


_KERNEL = _gaussian_kernel()


# --------------------------------------------------------------------------- SSIM machinery


def _check_shapes(*vols: ArrayLike) -> tuple[int, int, int]:
    shape = tuple(vols[0].shape)
    if len(shape) != 3:
        raise ValueError(f"SSIM needs 3-D volumes, got shape {shape}")
    for v in vols[1:]:
        if tuple(v.shape) != shape:
            raise ValueError(f"shape mismatch: {shape} vs {tuple(v.shape)}")
    if min(shape) < SSIM_WIN_SIZE:
        raise ValueError(f"every axis must be >= {SSIM_WIN_SIZE} voxels for 3-D SSIM, got shape {shape}")
    return shape  # type: ignore[return-value]


def _resolve_backend(device: Device) -> torch.device | None:
    """None -> CUDA if available else scipy; 'scipy'/'numpy' -> scipy; anything else -> that torch device."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else None
    if isinstance(device, str) and device in ("scipy", "numpy"):
        return None
    return torch.device(device)


def _block_rows(shape: tuple[int, int, int], budget: int, nz_default: int) -> tuple[int, int]:
    """Output rows per block along z and y so one block map holds about ``budget`` input voxels."""
    z, y, x = shape
    r = SSIM_RADIUS
    nz = min(z - 2 * r, nz_default)
    ny = budget // ((nz + 2 * r) * x) - 2 * r
    ny = max(16, min(y - 2 * r, ny))
    return nz, ny


def _blocks(shape: tuple[int, int, int], nz: int, ny: int) -> Iterator[tuple[int, int, int, int]]:
    """Output blocks (z0, z1, y0, y1) tiling the interior [r, n - r) that skimage averages over."""
    z, y, _ = shape
    r = SSIM_RADIUS
    for z0 in range(r, z - r, nz):
        for y0 in range(r, y - r, ny):
            yield z0, min(z0 + nz, z - r), y0, min(y0 + ny, y - r)


def _ssim_map_sum(ux: Any, uy: Any, uxx: Any, uyy: Any, uxy: Any, xp: Any) -> float:
    """Sum of the SSIM map over a block, as skimage writes it (population covariance, data range 1).

    Works on groups of z planes with in-place ops: temporaries stay cache-sized instead of
    allocating a dozen block-sized arrays, which is faster on a CPU (figures: docs/performance.md).
    """
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    on_gpu = xp is torch and ux.device.type != "cpu"  # GPUs prefer few big kernels and no per-chunk sync
    plane = int(ux[0].numel()) if xp is torch else int(ux[0].size)
    step = ux.shape[0] if on_gpu else max(1, _SSIM_CHUNK_VOXELS // max(plane, 1))
    total = 0.0
    for z in range(0, ux.shape[0], step):
        sl = slice(z, z + step)
        a, b = ux[sl], uy[sl]
        num = a * b  # ux uy
        cov = uxy[sl] - num  # sxy
        cov *= 2
        cov += c2
        num *= 2
        num += c1
        num *= cov  # (2 ux uy + C1)(2 sxy + C2)
        a2 = a * a
        b2 = b * b
        var = uxx[sl] - a2
        var += uyy[sl]
        var -= b2
        var += c2  # sx^2 + sy^2 + C2
        a2 += b2
        a2 += c1  # ux^2 + uy^2 + C1
        a2 *= var
        num /= a2
        total += float(num.sum(dtype=np.float64)) if xp is np else float(num.sum(dtype=torch.float64))
    return total


class _Moments:
    """Filtered first and second moments of the normalized blocks, computed once and shared.

    N_SSIM needs SSIM(pred, gt) and SSIM(input, gt): the gt maps are reused (8 maps, not 10).
    """

    def __init__(self, blocks: list, filt: Callable[[Any], Any], xp: Any) -> None:
        self.blocks = blocks
        self.filt = filt
        self.xp = xp
        self.cache: dict[tuple[int, int], Any] = {}

    def mean(self, i: int) -> Any:
        key = (i, -1)
        if key not in self.cache:
            self.cache[key] = self.filt(self.blocks[i])
        return self.cache[key]

    def product(self, i: int, j: int) -> Any:
        key = (min(i, j), max(i, j))
        if key not in self.cache:
            self.cache[key] = self.filt(self.blocks[i] * self.blocks[j])
        return self.cache[key]

    def ssim_sum(self, i: int, j: int) -> float:
        return _ssim_map_sum(
            self.mean(i), self.mean(j), self.product(i, i), self.product(j, j), self.product(i, j), self.xp
        )


def _filter_valid_np(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian, keeping only outputs whose 11^3 window lies inside the block."""
    r = SSIM_RADIUS
    out = ndi.correlate1d(x, _KERNEL, axis=0, output=np.float32, mode="reflect")[r:-r]
    out = ndi.correlate1d(out, _KERNEL, axis=1, output=np.float32, mode="reflect")[:, r:-r]
    return ndi.correlate1d(out, _KERNEL, axis=2, output=np.float32, mode="reflect")[:, :, r:-r]


def _filter_valid_torch(x: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_filter_valid_np` with symmetric shift-and-add passes (any torch device).

    Plain float32 elementwise ops: no cuDNN algorithm choice and no TF32 (a cuDNN conv3d would
    use TF32 by default on Ampere+, too coarse for the variance terms), and on a CPU faster than a
    (k,1,1) conv3d (figures: docs/performance.md).
    """
    r = SSIM_RADIUS
    w = [float(v) for v in _KERNEL]
    for axis in range(3):
        n = x.shape[axis] - 2 * r
        out = x.narrow(axis, r, n) * w[r]
        # in place, no temporaries: faster than summing the pair first (figures: docs/performance.md)
        for k in range(r):
            out.add_(x.narrow(axis, k, n), alpha=w[k]).add_(x.narrow(axis, 2 * r - k, n), alpha=w[k])
        x = out
    return x


def _to_numpy(v: ArrayLike) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _load_block_torch(v: ArrayLike, sl: tuple[slice, ...], device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v[sl].to(device)
    block = np.ascontiguousarray(v[sl])
    try:
        return torch.from_numpy(block).to(device)
    except TypeError:  # dtypes torch cannot wrap: convert on the host
        return torch.from_numpy(block.astype(np.float32)).to(device)


def _ssim_pairs(
    vols: Sequence[ArrayLike],
    norms: Sequence[VolumeNorm | None],
    pairs: Sequence[tuple[int, int]],
    *,
    device: Device = None,
    block: tuple[int, int] | None = None,
    workers: int | None = None,
) -> list[float]:
    """Mean SSIM for each (i, j) pair of volumes, streamed over blocks; normalizes blocks on the fly."""
    shape = _check_shapes(*vols)
    r = SSIM_RADIUS
    count = (shape[0] - 2 * r) * (shape[1] - 2 * r) * (shape[2] - 2 * r)
    backend = _resolve_backend(device)
    sums = [0.0] * len(pairs)

    if backend is None:
        nz, ny = block or _block_rows(shape, SLAB_VOXELS, _SCIPY_BLOCK_Z)
        arrays = [_to_numpy(v) for v in vols]

        def work(b: tuple[int, int, int, int]) -> list[float]:
            z0, z1, y0, y1 = b
            sl = (slice(z0 - r, z1 + r), slice(y0 - r, y1 + r), slice(None))
            blocks = [apply_norm_numpy(a[sl], n) for a, n in zip(arrays, norms, strict=True)]
            moments = _Moments(blocks, _filter_valid_np, np)
            return [moments.ssim_sum(i, j) for i, j in pairs]

        n_workers = max(1, workers or torch.get_num_threads())
        with ThreadPoolExecutor(n_workers) as pool:
            for part in pool.map(work, list(_blocks(shape, nz, ny))):
                sums = [s + p for s, p in zip(sums, part, strict=True)]
    else:
        nz, ny = block or _block_rows(shape, _TORCH_BLOCK_VOXELS, _TORCH_BLOCK_Z)
        with torch.no_grad():
            for z0, z1, y0, y1 in _blocks(shape, nz, ny):
                sl = (slice(z0 - r, z1 + r), slice(y0 - r, y1 + r), slice(None))
                blocks = [
                    apply_norm_torch(_load_block_torch(v, sl, backend), n)
                    for v, n in zip(vols, norms, strict=True)
                ]
                moments = _Moments(blocks, _filter_valid_torch, torch)
                sums = [s + moments.ssim_sum(i, j) for s, (i, j) in zip(sums, pairs, strict=True)]
                del blocks, moments
    return [s / count for s in sums]


def ssim3d(
    a: ArrayLike, b: ArrayLike, *, device: Device = None, block: tuple[int, int] | None = None
) -> float:
    """Mean 3-D SSIM of two volumes that are ALREADY normalized (data range 1).

    Definition (official code is not public; this equals skimage's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`` on 3-D input):

    * local means/variances/covariance from a Gaussian window, sigma 1.5 voxels, truncate 3.5
      (radius 5, 11 taps, separable, normalized weights as in scipy.ndimage.gaussian_filter);
    * ``S = (2 ux uy + C1)(2 sxy + C2) / ((ux^2 + uy^2 + C1)(sx^2 + sy^2 + C2))`` with
      population (co)variances, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 1``;
    * the mean of S over voxels at least 5 voxels from every border (skimage crops
      ``(win_size - 1) // 2 = 5`` before averaging). Those are exactly the voxels whose whole
      window lies inside the volume, so the filter's border mode never matters and only this
      interior is computed (the "valid" part of each 1-D pass).

    ``device``: None -> CUDA if available, else the scipy back end; "scipy" forces scipy; any
    torch device (e.g. "cpu", "cuda") uses the torch back end there. ``block`` = (z rows, y rows)
    of output per streamed block (default: sized from a voxel budget). Every axis must be >= 11.
    """
    return _ssim_pairs([a, b], [None, None], [(0, 1)], device=device, block=block)[0]


def normalized_gain(score_pred: float, score_input: float) -> float:
    """``(score_pred - score_input) / (1 - score_input)``: 0 for the identity, 1 for a perfect answer.

    NaN (with a warning) when the input already scores 1, where the gain is undefined.
    """
    den = 1.0 - score_input
    if abs(den) < 1e-12:
        log.warning("input already scores %.6f against the ground truth: N undefined", score_input)
        return float("nan")
    return (score_pred - score_input) / den


@dataclass(frozen=True)
class SsimScores:
    """SSIM of prediction and of input against the ground truth, and the resulting N_SSIM."""

    ssim_pred: float
    ssim_input: float
    n_ssim: float


def ssim_scores(
    pred: ArrayLike,
    gt: ArrayLike,
    inp: ArrayLike,
    *,
    device: Device = None,
    low: float = PERCENTILE_LOW,
    high: float = PERCENTILE_HIGH,
    block: tuple[int, int] | None = None,
) -> SsimScores:
    """Percentile-normalize each raw volume, then SSIM(pred, gt), SSIM(input, gt) and N_SSIM in one pass."""
    norms = [norm_of(v, low, high) for v in (gt, pred, inp)]
    s_pred, s_inp = _ssim_pairs([gt, pred, inp], norms, [(1, 0), (2, 0)], device=device, block=block)
    return SsimScores(ssim_pred=s_pred, ssim_input=s_inp, n_ssim=normalized_gain(s_pred, s_inp))


def ssim_against(pred: ArrayLike, gt: ArrayLike, *, device: Device = None) -> float:
    """SSIM(pred, gt) after the metric's percentile normalization of each: one term of N_SSIM, for
    callers that score many predictions of one case against the same SSIM(input, gt)."""
    norms = [norm_of(v, PERCENTILE_LOW, PERCENTILE_HIGH) for v in (gt, pred)]
    return _ssim_pairs([gt, pred], norms, [(1, 0)], device=device)[0]


def n_ssim(pred: ArrayLike, gt: ArrayLike, inp: ArrayLike, *, device: Device = None) -> float:
    """N_SSIM = (SSIM(pred, gt) - SSIM(input, gt)) / (1 - SSIM(input, gt)) after percentile normalization.

    Takes raw volumes (any dtype); each is normalized with its own p2/p99.8 (:func:`percentile_normalize`).
    """
    return ssim_scores(pred, gt, inp, device=device).n_ssim


# --------------------------------------------------------------------------- proxy IoU


def _minmax(x: np.ndarray) -> tuple[float, float]:
    flat = x.reshape(-1)
    lo, hi = math.inf, -math.inf
    for start in range(0, flat.size, SLAB_VOXELS):
        chunk = flat[start : start + SLAB_VOXELS]
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    return lo, hi


def otsu_threshold(x: ArrayLike, nbins: int = 256) -> float:
    """Otsu threshold as skimage.filters.threshold_otsu (256 bins over [min, max]), numpy only.

    Chunked histogram, so a 1 G-voxel volume needs no float copy. Foreground is ``x > threshold``.
    """
    arr = _to_numpy(x)
    lo, hi = _minmax(arr)
    if lo == hi:
        return lo
    flat = arr.reshape(-1)
    hist = np.zeros(nbins, dtype=np.float64)
    edges = np.linspace(lo, hi, nbins + 1)
    for start in range(0, flat.size, SLAB_VOXELS):
        hist += np.histogram(flat[start : start + SLAB_VOXELS], bins=nbins, range=(lo, hi))[0]
    centers = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(hist * centers) / weight1
        mean2 = (np.cumsum((hist * centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.nanargmax(variance12))])


def _mask_counts(a: np.ndarray, ta: float, b: np.ndarray, tb: float) -> tuple[int, int]:
    fa, fb = a.reshape(-1), b.reshape(-1)
    inter = union = 0
    for start in range(0, fa.size, SLAB_VOXELS):
        ma = fa[start : start + SLAB_VOXELS] > ta
        mb = fb[start : start + SLAB_VOXELS] > tb
        inter += int(np.count_nonzero(ma & mb))
        union += int(np.count_nonzero(ma | mb))
    return inter, union


def proxy_iou(a: ArrayLike, b: ArrayLike) -> float:
    """PROXY for the challenge's Cellpose IoU: IoU of the Otsu foreground masks of two volumes.

    Otsu on the percentile-normalized volume gives the same mask as on the raw one (an affine
    map with positive slope keeps the histogram's shape), so no normalized copy is made.
    Two empty masks count as identical (IoU 1).
    """
    arr_a, arr_b = _to_numpy(a), _to_numpy(b)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"shape mismatch: {arr_a.shape} vs {arr_b.shape}")
    inter, union = _mask_counts(arr_a, otsu_threshold(arr_a), arr_b, otsu_threshold(arr_b))
    return 1.0 if union == 0 else inter / union


@dataclass(frozen=True)
class IouProxyScores:
    """Proxy (Otsu) IoU of prediction and input against the ground truth, and the normalized gain."""

    iou_pred_proxy: float
    iou_input_proxy: float
    n_iou_proxy: float


def iou_proxy_scores(pred: ArrayLike, gt: ArrayLike, inp: ArrayLike) -> IouProxyScores:
    """Proxy IoU of prediction and input against the ground truth, normalized like N_SSIM."""
    iou_pred = proxy_iou(pred, gt)
    iou_inp = proxy_iou(inp, gt)
    return IouProxyScores(iou_pred, iou_inp, normalized_gain(iou_pred, iou_inp))


def n_iou_proxy(pred: ArrayLike, gt: ArrayLike, inp: ArrayLike) -> float:
    """PROXY N_IoU = (IoU(pred, gt) - IoU(input, gt)) / (1 - IoU(input, gt)) with Otsu masks, not Cellpose."""
    return iou_proxy_scores(pred, gt, inp).n_iou_proxy


# --------------------------------------------------------------------------- baseline


def gaussian_baseline(inp: np.ndarray, channel: str) -> np.ndarray:
    """The public reference baseline: a Gaussian blur of the input, sigma 0.442 (nucleus) or 0.5 voxels.

    Unknown channels use 0.5. Returns float32 (the metric normalizes it anyway).
    """
    sigma = BASELINE_SIGMA.get(channel, BASELINE_SIGMA_DEFAULT)
    return ndi.gaussian_filter(np.asarray(inp, dtype=np.float32), sigma=sigma, output=np.float32)
