"""Difference weighting, eq. (2) of Wodzinski & Mueller: keep the input where the network barely
changed it, take the network's output where it changed it most.

Two forms of the paper's formula: :func:`difference_weighting` builds new tensors (differentiable;
used in training on patches) and :func:`difference_weighting_` overwrites the network's output slab
by slab (inference on a whole volume, where five temporaries the size of the 0.6 um volume would not
fit beside it; memory: docs/performance.md, "What keeps fmc lean").

:func:`released_difference_weighting_` is the form of the authors' released code, which differs from
the paper's text: the weight map is computed coarse and smooth, and the max filter acts on it, not
on the output. Which form a model uses is a setting of its model card (:mod:`fmc.method`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fmc.memory import SLAB_VOXELS


def max_filter3d(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level dilation with a cube of odd ``size`` over the last three dims; borders use the
    valid neighbourhood.

    Separable shifted maxima (one axis at a time) instead of ``max_pool3d``: the same result, faster
    (no 27-voxel window per output voxel; figures: docs/performance.md).
    """
    if size % 2 == 0:
        raise ValueError(f"max_filter must be odd, got {size}")
    radius = size // 2
    if volume.requires_grad and torch.is_grad_enabled():
        # the in-place maxima below have no gradient; max_pool3d's -inf padding keeps the valid
        # neighbourhood too (training with --dw-train-max-filter)
        shape = volume.shape
        flat = volume.reshape(-1, 1, *shape[-3:])
        return torch.nn.functional.max_pool3d(flat, size, stride=1, padding=radius).reshape(shape)
    out = volume
    for dim in (-3, -2, -1):
        source, out = out, out.clone()
        length = source.shape[dim]
        for shift in range(1, min(radius, length - 1) + 1):
            later = out.narrow(dim, shift, length - shift)
            torch.maximum(later, source.narrow(dim, 0, length - shift), out=later)
            earlier = out.narrow(dim, 0, length - shift)
            torch.maximum(earlier, source.narrow(dim, shift, length - shift), out=earlier)
    return out


def difference_weighting(inp: torch.Tensor, initial: torch.Tensor, max_filter: int = 0) -> torch.Tensor:
    """Eq. (2): ``O = (1 - D) * I + D * O'`` with ``D = |I - O'|`` min-max normalized to [0, 1].

    At inference ``O'`` is first maximum-filtered (odd size ``max_filter``; 0 or 1 = off) to
    smooth it. Works on any shape with the spatial dims last (ZYX, CZYX or BCZYX).
    """
    if max_filter > 1:
        initial = max_filter3d(initial, max_filter)
    diff = (inp - initial).abs()
    low, high = diff.amin(), diff.amax()
    # clamp instead of a branch: no host sync, no grad warning, and D = 0 for a zero span.
    weight = (diff - low) / (high - low).clamp_min(torch.finfo(diff.dtype).tiny)
    return (1 - weight) * inp + weight * initial


def _check_two_volumes(inp: torch.Tensor, written: torch.Tensor) -> None:
    """The in-place forms blend plane by plane: two (Z, Y, X) volumes of one shape."""
    if inp.shape != written.shape or inp.dim() != 3:
        raise ValueError(
            f"expected two equal (Z, Y, X) volumes, got {tuple(inp.shape)} and {tuple(written.shape)}"
        )


def difference_weighting_(
    inp: torch.Tensor, initial: torch.Tensor, max_filter: int = 0, slab_voxels: int = SLAB_VOXELS
) -> torch.Tensor:
    """:func:`difference_weighting` of two (Z, Y, X) volumes, written into ``initial``; returns it.

    Two passes over z-slabs: the first max-filters ``initial`` in place and finds the range of
    ``D``, the second writes the blend. The max filter reads ``max_filter // 2`` planes beyond
    each slab, so the planes just above a slab are kept before they are overwritten. Extra
    memory: a few slabs of ``slab_voxels``.
    """
    _check_two_volumes(inp, initial)
    if inp.data_ptr() == initial.data_ptr():
        raise ValueError("initial must not share memory with inp: it is overwritten")
    halo = max_filter // 2 if max_filter > 1 else 0
    if max_filter > 1 and max_filter % 2 == 0:
        raise ValueError(f"max_filter must be odd, got {max_filter}")
    depth = inp.shape[0]
    rows = max(halo, 1, slab_voxels // max(1, inp.shape[1] * inp.shape[2]))

    def smoothed(z0: int, z1: int, above: torch.Tensor | None) -> torch.Tensor:
        """Max-filtered ``initial[z0:z1]``; ``above`` replaces the ``halo`` planes before z0."""
        top = min(depth, z1 + halo)
        if above is None:
            start = max(0, z0 - halo)
            block = initial[start:top]
        else:
            start = z0 - above.shape[0]
            block = torch.cat([above, initial[z0:top]])
        return max_filter3d(block, max_filter)[z0 - start : z1 - start]

    # Pass 1: initial <- max-filtered initial, in place, and the range of D = |I - O'|.
    low = torch.full((), float("inf"), device=inp.device)
    high = torch.full((), float("-inf"), device=inp.device)
    above: torch.Tensor | None = None
    for z0 in range(0, depth, rows):
        z1 = min(depth, z0 + rows)
        if halo:
            filtered = smoothed(z0, z1, above)
            above = initial[max(0, z1 - halo) : z1].clone()  # originals, before this slab is written
            initial[z0:z1] = filtered
        diff = (inp[z0:z1] - initial[z0:z1]).abs_()
        low, high = torch.minimum(low, diff.amin()), torch.maximum(high, diff.amax())
    span = (high - low).clamp_min(torch.finfo(inp.dtype).tiny)

    # Pass 2: (1 - D) I + D O' == I + D (O' - I), with D min-max normalized.
    for z0 in range(0, depth, rows):
        z1 = min(depth, z0 + rows)
        weight = (inp[z0:z1] - initial[z0:z1]).abs_().sub_(low).div_(span)
        initial[z0:z1].sub_(inp[z0:z1]).mul_(weight).add_(inp[z0:z1])
    return initial


@dataclasses.dataclass(frozen=True)
class ReleasedForm:
    """The released code's constants, one object so both of its functions take them alike."""

    grid: int = 128  # the weight map's edge (voxels)
    max_filter: int = 9  # the max filter on the weight map (odd; 1 = off)
    sigma: float = 3.0  # the Gaussian on the weight map (grid voxels)
    percentiles: tuple[float, float] = (2.0, 98.0)  # the weight map's min-max normalization


#: The released code's values.
RELEASED = ReleasedForm()


def gaussian_blur3d(volume: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian of a (Z, Y, X) tensor, replicated edges; ``sigma`` 0 returns a copy."""
    if sigma <= 0:
        return volume.clone()
    radius = max(1, math.ceil(truncate * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=volume.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = volume[None, None].float()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def released_weight_map(
    inp: torch.Tensor, prediction: torch.Tensor, form: ReleasedForm = RELEASED
) -> torch.Tensor:
    """The released code's weight map at ``form.grid``^3: ``|I - O|`` resampled, max-filtered, smoothed,
    percentile-normalized and clipped to [0, 1]."""
    from fmc.resample import resample_to_shape

    class _Difference:
        """|I - O| handed out band by band, so no full-size temporary is made."""

        shape = tuple(int(n) for n in inp.shape)
        device = inp.device

        @staticmethod
        def planes(z0: int, z1: int) -> torch.Tensor:
            return (inp[z0:z1].float() - prediction[z0:z1].float()).abs_()

    small = resample_to_shape(_Difference(), (form.grid,) * 3)
    if form.max_filter > 1:
        small = max_filter3d(small, form.max_filter)
    small = gaussian_blur3d(small, form.sigma)
    low_percent, high_percent = form.percentiles
    q = torch.tensor([low_percent / 100.0, high_percent / 100.0], device=small.device)
    low, high = torch.quantile(small.reshape(-1), q).tolist()
    return ((small - low) / max(high - low, 1e-12)).clamp_(0.0, 1.0)


def released_difference_weighting_(
    inp: torch.Tensor, prediction: torch.Tensor, form: ReleasedForm = RELEASED
) -> torch.Tensor:
    """``I * (1 - D) + O * D`` with the released code's ``D`` (upsampled slab by slab), written into
    ``prediction``; returns it."""
    from fmc.resample import resample_slabs

    _check_two_volumes(inp, prediction)
    weight = released_weight_map(inp, prediction, form)
    for z0, slab in resample_slabs(weight, tuple(inp.shape)):
        z1 = z0 + slab.shape[0]
        prediction[z0:z1].sub_(inp[z0:z1]).mul_(slab).add_(inp[z0:z1])
    return prediction
