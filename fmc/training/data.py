"""Datasets over the prepared cache: global volumes (step 1), random crops (step 2), validation cases.

Arrays are memory-mapped float16 ``.npy`` files; only the crop is copied to float32, so
many workers share the page cache. Randomness comes from torch's per-worker generator,
which Lightning seeds (``seed_everything(workers=True)``), so runs are reproducible
and every DDP rank / worker draws different crops.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fmc.training.cache import CachedCase
from fmc.training.config import TARGET_FRAMES


def random_flips(*tensors: torch.Tensor, dims: tuple[int, ...] = (-3, -2, -1)) -> tuple[torch.Tensor, ...]:
    """Flip all tensors together along each spatial axis with probability 1/2."""
    flip = [d for d in dims if bool(torch.rand(()) < 0.5)]
    if not flip:
        return tensors
    return tuple(t.flip(flip) for t in tensors)


def random_start(size: int, patch: int) -> int:
    """A uniform crop start; 0 when the axis is not longer than the patch (it gets padded)."""
    if size <= patch:
        return 0
    return int(torch.randint(0, size - patch + 1, ()).item())


def pad_to(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Mirror-pad the trailing three axes up to ``shape`` (volumes smaller than a patch, as at inference)."""
    extra = [max(0, want - have) for want, have in zip(shape, array.shape[-3:], strict=True)]
    if not any(extra):
        return array
    widths = [(0, 0)] * (array.ndim - 3) + [(e // 2, e - e // 2) for e in extra]
    return np.pad(array, widths, mode="symmetric")


class _CacheReader:
    """Opens each cached array once per process (memory maps do not survive pickling to workers)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self._open: dict[Path, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "_open": {}}

    def get(self, path: Path) -> np.ndarray:
        array = self._open.get(path)
        if array is None:
            array = np.load(path, mmap_mode="r")
            self._open[path] = array
        return array


class GlobalDataset(Dataset):
    """Step 1: each item is a whole case at ``global_size``^3: ``(input (1,G,G,G), target (1,G,G,G))``."""

    def __init__(self, cache: Path, cases: list[CachedCase], flips: bool = True) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.flips = flips
        self.reader = _CacheReader(cache)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        cache = self.reader.cache
        x = torch.from_numpy(
            np.asarray(self.reader.get(case.array_path(cache, "input_global")), dtype=np.float32)
        )
        y = torch.from_numpy(
            np.asarray(self.reader.get(case.array_path(cache, "target_global")), dtype=np.float32)
        )
        x, y = x[None], y[None]
        if self.flips:
            x, y = random_flips(x, y)
        return x.contiguous(), y.contiguous()


class PatchDataset(Dataset):
    """Step 2: random ``patch``^3 crops of [input, step-1 output(, distance)] and the target, flipped.

    ``step1_dir`` holds the cached step-1 predictions (``<case id>.npy``, 0.6 um grid);
    ``None`` trains the patch-only ablation (one input channel). The epoch is
    ``len(cases) * patches_per_case`` items, cycling over the cases so each is seen equally.

    ``target_frame="input"`` maps each case's target by the affine map that best fits it to the
    case's input (least squares over the whole volume): the metric normalizes every prediction by
    its own percentiles, so a global scale and offset are free, and a patch cannot know the
    target's (its brightest nucleus may lie anywhere). The network then learns the change of
    the input it sees, not a guess at a per-case intensity frame.
    """

    def __init__(
        self,
        cache: Path,
        cases: list[CachedCase],
        patch: int,
        patches_per_case: int = 16,
        step1_dir: Path | None = None,
        flips: bool = True,
        target_frame: str = "target",
        distance: bool = False,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        if target_frame not in TARGET_FRAMES:
            raise ValueError(f"target_frame must be one of {TARGET_FRAMES}, got {target_frame!r}")
        self.cases = cases
        self.patch = patch
        self.length = len(cases) * max(1, patches_per_case)
        self.step1_dir = step1_dir
        self.flips = flips
        self.target_frame = target_frame
        self.distance = distance  # a last channel: the cached signed surface distance (fmc.distance)
        self.reader = _CacheReader(cache)
        self._affine: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index % len(self.cases)]
        cache = self.reader.cache
        sources = [self.reader.get(case.array_path(cache, "input"))]
        if self.step1_dir is not None:
            sources.append(self.reader.get(self.step1_dir / f"{case.id}.npy"))
        if self.distance:
            sources.append(self.reader.get(case.array_path(cache, "distance")))
        target = self.reader.get(case.array_path(cache, "target"))
        shape = target.shape
        starts = [random_start(size, self.patch) for size in shape]
        window = tuple(slice(s, s + self.patch) for s in starts)
        want = (self.patch,) * 3
        x = np.stack([pad_to(np.asarray(src[window], dtype=np.float32), want) for src in sources])
        y = pad_to(np.asarray(target[window], dtype=np.float32), want)[None]
        if self.target_frame == "input":
            if case.id not in self._affine:
                self._affine[case.id] = fit_affine(np.asarray(target), np.asarray(sources[0]))
            scale, offset = self._affine[case.id]
            y = y * np.float32(scale) + np.float32(offset)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.flips:
            xt, yt = random_flips(xt, yt)
        return xt.contiguous(), yt.contiguous()


def fit_affine(source: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimizing ``sum((a * source + b - reference)^2)``; ``(1, 0)`` when that fit is not
    increasing (a constant source, or no positive relation)."""
    s = source.astype(np.float64).ravel()
    r = reference.astype(np.float64).ravel()
    variance = s.var()
    if variance <= 0:
        return 1.0, 0.0
    scale = float(((s - s.mean()) * (r - r.mean())).mean() / variance)
    if not scale > 0:
        return 1.0, 0.0
    return scale, float(r.mean() - scale * s.mean())


def upsampling_coordinates(indices: np.ndarray, size: int) -> np.ndarray:
    """``grid_sample`` coordinates (align_corners=False) of iso voxels ``indices`` on an axis of ``size``.

    Voxel centres map half-pixel to half-pixel, as trilinear upsampling of the global output to
    the 0.6 um grid does, so sampling the global output there is the pipeline's upsampling.
    """
    return (2 * (indices.astype(np.float32) + 0.5) / size - 1).astype(np.float32)


class JointDataset(Dataset):
    """Joint training: a case's global volumes plus a random crop and where the crop lies in them.

    Items: ``(x_global (1,G,G,G), y_global, x_patch (1,P,P,P), y_patch, grid (P,P,P,3))``; the
    module runs step 1 on ``x_global`` and samples its output at ``grid`` (``F.grid_sample``
    order x, y, z) to make step 2's second channel differentiably. A flip is applied to the
    global volumes and the crop alike, with the crop's coordinates mirrored to match.
    """

    def __init__(
        self, cache: Path, cases: list[CachedCase], patch: int, patches_per_case: int = 16, flips: bool = True
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.patch = patch
        self.length = len(cases) * max(1, patches_per_case)
        self.flips = flips
        self.reader = _CacheReader(cache)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        case = self.cases[index % len(self.cases)]
        cache = self.reader.cache
        read = self.reader.get
        target = read(case.array_path(cache, "target"))
        shape = target.shape
        starts = [random_start(size, self.patch) for size in shape]
        window = tuple(slice(s, s + self.patch) for s in starts)
        want = (self.patch,) * 3
        x_patch = pad_to(np.asarray(read(case.array_path(cache, "input"))[window], dtype=np.float32), want)
        y_patch = pad_to(np.asarray(target[window], dtype=np.float32), want)
        coords = []
        for start, size in zip(starts, shape, strict=True):
            indices = np.arange(start, min(start + self.patch, size))
            if len(indices) < self.patch:
                indices = _pad_1d(indices, self.patch)
            coords.append(upsampling_coordinates(indices, size))
        x_glob = np.asarray(read(case.array_path(cache, "input_global")), dtype=np.float32)
        y_glob = np.asarray(read(case.array_path(cache, "target_global")), dtype=np.float32)
        if self.flips:
            for axis in range(3):
                if bool(torch.rand(()) < 0.5):
                    x_glob, y_glob = np.flip(x_glob, axis), np.flip(y_glob, axis)
                    x_patch, y_patch = np.flip(x_patch, axis), np.flip(y_patch, axis)
                    coords[axis] = -coords[axis][::-1]
        cz, cy, cx = np.meshgrid(*coords, indexing="ij")
        grid = np.stack([cx, cy, cz], axis=-1)  # grid_sample wants (x, y, z) = (X, Y, Z) order
        arrays = (x_glob[None], y_glob[None], x_patch[None], y_patch[None], grid)
        return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


def _pad_1d(indices: np.ndarray, length: int) -> np.ndarray:
    """Indices padded like :func:`pad_to` pads the crop (symmetric, split before/after)."""
    extra = length - len(indices)
    return np.pad(indices, (extra // 2, extra - extra // 2), mode="symmetric")


class ValidationCases(Dataset):
    """Validation items are case records (plain dicts); the module runs the real pipeline on each."""

    def __init__(self, cases: list[CachedCase]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "case": asdict(self.cases[index])}


def first_item(batch: list[Any]) -> Any:
    """Collate for batch size 1 of records: no stacking (module-level so workers can pickle it)."""
    return batch[0]
