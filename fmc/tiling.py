"""Overlapping-patch inference blended with a floored Hann window (MONAI-style functional core).

Why a Hann window with a positive floor: averaging overlapping patches with a window that falls
towards the patch borders hides the seams where the network lacks context (LightMyCells), and the
floor keeps every voxel's weight positive, also at the volume's own border where only a patch edge
covers it.

Patches at the volume's border keep weight 1 on their outer half along that axis: no other patch
covers those voxels, and a tapered window there would let the floor-weighted border of a
neighbouring patch (which lacks context) take a large share near the volume's edges and corners.

Memory: a patch's window is ``floor + (1 - floor) * pz(z) py(y) px(x)`` and the patch grid is a
product of per-axis start lists, so the weight sum at a voxel is ``floor * Nz Ny Nx + (1 - floor)
* Pz Py Px`` with 1-D coverage counts N and profile sums P. It is computed from 1-D arrays at the
end instead of accumulated as a full volume, which saves one 0.6 um volume of device memory
(memory: docs/performance.md, "What keeps fmc lean").
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Protocol

import torch
import torch.nn.functional as F

from fmc.memory import SLAB_VOXELS
from fmc.method import DEFAULT_PATCH

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
Predictor = Callable[[torch.Tensor], torch.Tensor]
#: Picks the function that predicts the next batch, before its patches are gathered:
#: ``(predictor, done, count, total)`` (patches before the batch, in it, in the whole pass) -> a
#: predictor. Why a hook: a deadline (``fmc.safeguards.Deadline``) can give the last patches a
#: cheap stand-in, and this loop knows nothing of time.
BatchChooser = Callable[[Predictor, int, int, int], Predictor]
LOG_EVERY_SECONDS = 30.0


@dataclass
class TilingConfig:
    """Sliding-window settings. ``patch`` is (z, y, x) voxels; ``overlap`` the fraction in [0, 1)."""

    patch: tuple[int, int, int] = (DEFAULT_PATCH,) * 3
    overlap: float = 0.5
    batch: int = 2
    window_floor: float = 1e-3

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive sizes, got {self.patch}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not 0.0 < self.window_floor <= 1.0:
            raise ValueError(f"window_floor must be in (0, 1], got {self.window_floor}")


class PatchSource(Protocol):
    """Where the patches come from when the input is not one stored (C, Z, Y, X) tensor.

    Why: step 2's second channel (the step-1 output) can be upsampled per patch instead of stored
    at full resolution; a source hands out each patch on demand.
    """

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial size (Z, Y, X)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def patch(self, start: Shape3, size: Shape3) -> torch.Tensor:
        """The (C, *size) box at ``start``; ``start + size`` lies inside ``shape``."""
        ...


class TensorSource:
    """A stored (C, Z, Y, X) tensor as a :class:`PatchSource` (patches are views)."""

    def __init__(self, volume: torch.Tensor) -> None:
        self.volume = volume
        z, y, x = volume.shape[1:]
        self.shape = (int(z), int(y), int(x))
        self.device = volume.device

    def patch(self, start: Shape3, size: Shape3) -> torch.Tensor:
        (z, y, x), (pz, py, px) = start, size
        return self.volume[:, z : z + pz, y : y + py, x : x + px]


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices along one axis: first 0, last ``size - patch`` (flush), steps at most the nominal.

    Nominal step ``max(1, int(patch * (1 - overlap)))``; the count is the fewest that keeps every
    step within it, and the starts are spread evenly (as nnU-Net) so no patch hangs past the edge.
    """
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    spacing = (size - patch) / (count - 1)
    return [math.floor(i * spacing + 0.5) for i in range(count)]


def _hann_1d(n: int) -> torch.Tensor:
    """Symmetric Hann (periodic=False) in float64; a single sample is 1."""
    return (
        torch.hann_window(n, periodic=False, dtype=torch.float64)
        if n > 1
        else torch.ones(1, dtype=torch.float64)
    )


@functools.lru_cache(maxsize=16)
def _hann_window_cached(patch: Shape3, floor: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
        hz, hy, hx = (_hann_1d(n) for n in patch)
        hann = hz[:, None, None] * hy[None, :, None] * hx[None, None, :]
        return (floor + (1.0 - floor) * hann).to(device=device, dtype=torch.float32)


def hann_window(patch: Sequence[int], floor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """3-D blending window ``floor + (1 - floor) * hann_z hann_y hann_x``, values in [floor, 1].

    Symmetric; its maximum is 1 for odd sizes and slightly below for even ones (no centre sample).
    Cached per (patch, floor, device): treat the result as read-only.
    """
    shape = tuple(int(p) for p in patch)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"patch must be three positive sizes, got {tuple(patch)}")
    return _hann_window_cached(shape, float(floor), torch.device(device if device is not None else "cpu"))


def _pad_to_patch(volume: torch.Tensor, patch: Shape3) -> tuple[torch.Tensor, list[int]]:
    """Reflect-pad (replicate when reflection is impossible) axes shorter than the patch."""
    before = [0, 0, 0]
    for axis in range(3):
        size = volume.shape[1 + axis]
        if size >= patch[axis]:
            continue
        total = patch[axis] - size
        lo, hi = total // 2, total - total // 2
        pad = [0] * 6  # F.pad order: (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)
        pad[2 * (2 - axis)], pad[2 * (2 - axis) + 1] = lo, hi
        mode = "reflect" if max(lo, hi) < size else "replicate"
        volume = F.pad(volume[None], pad, mode=mode)[0]
        before[axis] = lo
        log.debug("axis %d: %d < patch %d, %s-padded by (%d, %d)", axis, size, patch[axis], mode, lo, hi)
    return volume, before


def _axis_profiles(starts: list[int], patch: int) -> list[torch.Tensor]:
    """1-D window per start (float64): Hann, flat 1 on the outer half of the first and last patch."""
    hann = _hann_1d(patch)
    half = patch // 2
    profiles = []
    for i in range(len(starts)):
        profile = hann.clone()
        if i == 0:
            profile[:half] = 1.0
        if i == len(starts) - 1:
            profile[patch - half :] = 1.0
        profiles.append(profile)
    return profiles


def _axis_weight_sums(
    size: int, patch: int, starts: list[int], profiles: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis coverage count and profile sum (float64) over all patch positions along one axis."""
    count = torch.zeros(size, dtype=torch.float64)
    total = torch.zeros(size, dtype=torch.float64)
    for s, profile in zip(starts, profiles, strict=True):
        count[s : s + patch] += 1.0
        total[s : s + patch] += profile
    return count, total


def _normalize(out: torch.Tensor, sums: list[tuple[torch.Tensor, ...]], floor: float) -> None:
    """Divide the weighted sum by the weight sum, built from 1-D factors slab by slab (in place).

    The factors are exact float64 sums on the host; the slab product runs in float32 on the
    device (relative error ~1e-7; no float64 arithmetic on GPUs that are slow at it).
    """
    (cz, hz), (cy, hy), (cx, hx) = sums
    device = out.device
    count_yx = (floor * cy[:, None] * cx[None, :]).to(device, torch.float32)
    hann_yx = ((1.0 - floor) * hy[:, None] * hx[None, :]).to(device, torch.float32)
    cz, hz = cz.to(device, torch.float32), hz.to(device, torch.float32)
    plane = out.shape[2] * out.shape[3]
    rows = max(1, SLAB_VOXELS // plane)
    for z0 in range(0, out.shape[1], rows):
        z1 = min(z0 + rows, out.shape[1])
        weight = cz[z0:z1, None, None] * count_yx
        weight.addcmul_(hz[z0:z1, None, None], hann_yx)
        out[:, z0:z1].div_(weight)


class _Progress:
    """Patches done, patches/s and ETA at INFO every ~30 s and at 25/50/75/100 %; tqdm on a TTY."""

    def __init__(self, total: int, enabled: bool, device: torch.device) -> None:
        self.total, self.enabled, self.device = total, enabled, device
        self.start = self.last_log = time.perf_counter()
        self.done = 0
        self.next_quarter = 1
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="patch", desc="patches", leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.enabled:
            return
        now = time.perf_counter()
        quarter = self.done * 4 >= self.next_quarter * self.total
        if not quarter and now - self.last_log < LOG_EVERY_SECONDS:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # else the rate counts queued, not finished, work
            now = time.perf_counter()
        while self.next_quarter <= 4 and self.done * 4 >= self.next_quarter * self.total:
            self.next_quarter += 1
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "patches %d/%d (%.0f%%), %.2f patches/s, ETA %.0f s",
            self.done,
            self.total,
            100.0 * self.done / self.total,
            rate,
            eta,
        )
        self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _pad_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last patch up to ``size`` patches.

    Why: a last, smaller batch is a new input shape, for which ``torch.compile`` compiles
    again (tens of seconds) and cuDNN's autotuner times its algorithms again; a few
    repeated patches cost less.
    """
    missing = size - batch.shape[0]
    if missing <= 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])


def sliding_window_inference(
    volume: torch.Tensor | PatchSource,
    predictor: Predictor,
    config: TilingConfig,
    *,
    progress: bool = True,
    accumulate_on: torch.device | str | None = None,
    choose: BatchChooser | None = None,
) -> torch.Tensor:
    """Run ``predictor`` on overlapping patches of a (C, Z, Y, X) volume and blend the outputs.

    ``volume`` is a tensor or a :class:`PatchSource`. ``predictor`` maps (B, C, pz, py, px) to
    (B, C_out, pz, py, px); C_out comes from its first call. Returns (C_out, Z, Y, X) float32 on
    the volume's device. Axes shorter than the patch are reflect-padded and cropped back (a source
    is then read whole first: it is small). Accumulation stays on the device; memory is the input
    plus one output volume plus a batch of patches. ``accumulate_on`` moves the output volume
    elsewhere (the host, when the GPU is out of memory); the result is then returned on that device.
    ``choose`` (see :data:`BatchChooser`) picks each batch's predictor; without it, ``predictor``.
    """
    if isinstance(volume, torch.Tensor):
        if volume.dim() != 4:
            raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(volume.shape)}")
        if min(volume.shape) < 1:
            raise ValueError(f"volume is empty: shape {tuple(volume.shape)}")
        source: PatchSource = TensorSource(volume)
    else:
        source = volume
    device = source.device
    target = device if accumulate_on is None else torch.device(accumulate_on)
    patch: Shape3 = config.patch
    original = source.shape
    floor = float(config.window_floor)

    with torch.inference_mode():
        before = [0, 0, 0]
        if any(size < p for size, p in zip(original, patch, strict=True)):
            whole = source.patch((0, 0, 0), original)
            padded, before = _pad_to_patch(whole, patch)
            source = TensorSource(padded)
        spatial = source.shape
        starts = [patch_starts(spatial[a], patch[a], config.overlap) for a in range(3)]
        indices = list(product(*(range(len(s)) for s in starts)))
        profiles = [_axis_profiles(starts[a], patch[a]) for a in range(3)]
        on_device = [[p.to(device=target, dtype=torch.float32) for p in axis] for axis in profiles]
        interior = hann_window(patch, floor, target)
        last = [len(s) - 1 for s in starts]

        def window(index: tuple[int, int, int]) -> torch.Tensor:
            if all(0 < i < n for i, n in zip(index, last, strict=True)):
                return interior
            pz, py, px = (on_device[a][index[a]] for a in range(3))
            return (pz[:, None, None] * py[None, :, None] * px[None, None, :]).mul_(1.0 - floor).add_(floor)

        log.debug(
            "tiling %s with patch %s: %s starts, %d patches",
            spatial,
            patch,
            [len(s) for s in starts],
            len(indices),
        )
        out: torch.Tensor | None = None
        tracker = _Progress(len(indices), progress, device)
        full = config.batch if len(indices) > config.batch else len(indices)  # one forward shape
        try:
            for b0 in range(0, len(indices), config.batch):
                chunk = indices[b0 : b0 + config.batch]
                corners = [(starts[0][i], starts[1][j], starts[2][k]) for i, j, k in chunk]
                chosen = predictor if choose is None else choose(predictor, b0, len(chunk), len(indices))
                batch = torch.stack([source.patch(corner, patch) for corner in corners])
                pred = chosen(_pad_batch(batch, full))
                if pred.shape[0] == full > len(chunk):
                    pred = pred[: len(chunk)]
                if pred.dim() != 5 or pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != patch:
                    raise ValueError(
                        f"predictor returned shape {tuple(pred.shape)} for a batch of {tuple(batch.shape)}"
                    )
                pred = pred.to(device=target, dtype=torch.float32)
                if out is None:
                    out = torch.zeros((pred.shape[1], *spatial), dtype=torch.float32, device=target)
                elif pred.shape[1] != out.shape[0]:
                    raise ValueError(
                        f"predictor changed its channel count from {out.shape[0]} to {pred.shape[1]}"
                    )
                for i, (z, y, x) in enumerate(corners):
                    out[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]].addcmul_(
                        pred[i], window(chunk[i])
                    )
                del batch, pred
                tracker.update(len(chunk))
        finally:
            tracker.close()
        assert out is not None
        sums = [_axis_weight_sums(spatial[a], patch[a], starts[a], profiles[a]) for a in range(3)]
        _normalize(out, sums, floor)
        if tuple(out.shape[1:]) != original:
            out = out[
                :,
                before[0] : before[0] + original[0],
                before[1] : before[1] + original[1],
                before[2] : before[2] + original[2],
            ].contiguous()
    return out
