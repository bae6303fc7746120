"""Synthetic single-view / fused lightsheet pairs, simulated physically.

No FuseMyCells data can be fetched where this project is built and tested, yet tests, the
bundled sample case and the default weights all need image pairs. So we simulate them:

* **specimen** — an ellipsoidal embryo/organoid of packed cells. Cell centres are a randomly
  rotated, jittered lattice inside the ellipsoid; cells are their Voronoi regions. The membrane
  channel is the cell boundaries (plus the specimen envelope), the nucleus channel one textured
  ellipsoidal nucleus per cell with varied size, shape and brightness.
* **fused target** — the specimen seen through a small, near-isotropic Gaussian PSF with little
  noise. The PSF is applied *analytically* (each membrane or nuclear edge gets the Gaussian
  profile a blurred sheet has along its normal), then sampled at voxel centres of the study-like
  anisotropic grid, so thin structures are rendered without a costly high-resolution pass.
* **angle input** — the same specimen as one view sees it: illumination attenuated along the
  light-sheet axis from the lit side (with stripes behind absorbing structures), detection
  attenuated along z from the detection side, an extra anisotropic blur (axial worse) that grows
  with depth (a blend of a few precomputed blur levels), scattering haze (a wide blur of the
  emission), then camera noise: Poisson photons, Gaussian read noise and an offset.
* **lightsheet effects real views show** (off in :class:`SimulationParams`' defaults, drawn by
  :func:`random_params`): the sheet is a focused Gaussian beam, thinnest at its waist and
  thicker towards the far side of the field (more axial blur away from the waist); the sheet's
  height profile dims the field across the other lateral axis; and the lit field is uneven
  (a smooth multiplicative field: lamp, objective vignetting, refractive lensing).

This is the *training* family of forward models. :mod:`fmc.simulate_heldout` is a second family,
written separately with other physics, that is never trained on: it scores models and picks
checkpoints, so a model cannot win by learning this simulator's quirks.

Both volumes share one grid (shape and spacing) and are uint16. Everything is drawn from a seeded
:class:`numpy.random.Generator`: the same parameters and seed give the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree

from fmc.method import CHANNELS
from fmc.normalization import clip_to_uint16
from fmc.pair_cli import pair_parser, parse_pair_args
from fmc.pair_files import write_pairs

log = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]
Shape3 = tuple[int, int, int]

#: Spacing (z, y, x) in micrometres of the five FuseMyCells studies (docs/task.md, Data).
STUDY_SPACINGS: dict[int, Vec3] = {
    1: (1.0, 0.195, 0.195),
    2: (1.0, 0.195, 0.195),
    3: (1.0, 0.39, 0.39),
    4: (3.0, 0.33, 0.33),
    5: (1.01, 0.388, 0.388),
}
#: Studies that carry a membrane channel.
MEMBRANE_STUDIES = (1, 3)
#: Shape and spacing of the bundled sample case: at 0.6 um isotropic it is 80 x 98 x 98 voxels.
SAMPLE_SHAPE: Shape3 = (48, 300, 300)
SAMPLE_SPACING: Vec3 = STUDY_SPACINGS[1]
SAMPLE_SEED = 7

_SQRT2 = math.sqrt(2.0)


@dataclass
class SimulationParams:
    """Every knob of one simulated pair; lengths in micrometres, axes in (z, y, x) order.

    Defaults describe a middle-of-the-road specimen; :func:`random_params` draws them for training.
    """

    # grid and labels
    shape: Shape3 = (64, 256, 256)
    spacing: Vec3 = (1.0, 0.3, 0.3)
    channel: str = "nucleus"
    study: int | None = None  # study the spacing imitates; written to metadata, None = absent

    # specimen geometry: semi-axes = min(half FOV) * radius_fraction * aspect, capped at 1.1 * half FOV
    radius_fraction: float = 0.9
    aspect: Vec3 = (1.0, 1.0, 1.1)
    center_shift: Vec3 = (0.0, 0.0, 0.0)  # fraction of the half FOV
    cell_spacing_um: float = 8.0  # lattice constant = mean distance between neighbouring cells
    seed_jitter: float = 0.3  # lattice jitter, fraction of cell_spacing_um

    # nuclei (nucleus channel)
    nucleus_fraction: float = 0.75  # nucleus radius / half the mean distance to neighbouring cells
    nucleus_size_spread: float = 0.15
    nucleus_aspect_spread: float = 0.2
    mitotic_fraction: float = 0.03  # small, bright, elongated nuclei
    # membranes (membrane channel)
    membrane_width_um: float = 0.25  # Gaussian sigma of the membrane sheet before the PSF
    envelope_brightness: float = 1.0  # outer surface of the specimen (membrane channel)
    # both channels
    brightness_spread: float = 0.35  # lognormal sigma of per-cell brightness
    edge_um: float = 0.15  # intrinsic softness of nuclear edges
    texture_amplitude: float = 0.3  # chromatin / membrane patchiness (relative)
    texture_scale_um: float = 0.6
    cytoplasm_level: float = 0.06  # diffuse signal inside the specimen
    background_level: float = 0.01  # medium autofluorescence outside the specimen

    # fused target
    fused_sigma_um: Vec3 = (0.6, 0.28, 0.28)  # PSF Gaussian sigma (pixel integration is added)
    fused_attenuation: float = 0.15  # residual dimming of the specimen core after fusion

    # angle input: geometry of the single view
    illumination_axis: int = 2  # 2 = x, 1 = y
    illumination_from_end: bool = False  # light enters at the high-index side of that axis
    detection_from_end: bool = False  # detection objective at the high-z side
    attenuation_illumination_per_um: float = 0.012
    attenuation_detection_per_um: float = 0.015
    stripe_strength: float = 0.3  # extra absorption by bright structures -> shadows along the sheet
    # angle input: depth-dependent blur (extra to the fused PSF); depth t in [0, 1]
    depth_weight_detection: float = 0.7  # t = w * detection depth + (1 - w) * illumination depth
    blur_surface_um: Vec3 = (1.2, 0.08, 0.08)
    blur_deep_um: Vec3 = (2.8, 0.6, 0.6)
    blur_levels: int = 4
    haze_fraction: float = 0.2
    haze_sigma_um: float = 8.0
    # angle input: the light sheet as a Gaussian beam and an uneven lit field (0 = off)
    sheet_growth: float = 0.0  # extra depth t at the field's edge from the beam's divergence
    sheet_waist: float = 0.5  # waist position along the illumination axis, fraction from the lit side
    beam_height_fraction: float = 0.0  # 1/e^2 half-height of the sheet / half the other lateral FOV
    uneven_illumination: float = 0.0  # log-amplitude of the smooth multiplicative illumination field
    uneven_scale_um: float = 30.0  # correlation length of that field

    # cameras (ADU = offset + gain * photons + read noise)
    photons: float = 300.0  # photons per unit signal at the surface
    gain: float = 1.0
    read_noise: float = 2.5
    offset: float = 100.0
    ambient_photons: float = 2.0
    fused_photons: float = 5000.0
    fused_gain: float = 1.0
    fused_read_noise: float = 1.0
    fused_offset: float = 0.0

    # algorithm
    candidates: int = 8  # nearest cells tried per coarse block when labelling voxels

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive floats, got {self.spacing}")
        if self.illumination_axis not in (1, 2):
            raise ValueError("illumination_axis must be 1 (y) or 2 (x)")
        if self.blur_levels < 2:
            raise ValueError("blur_levels must be >= 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Specimen:
    """Geometry shared by the render and the degradation steps."""

    center: np.ndarray  # (3,) um
    radii: np.ndarray  # (3,) um
    render: np.ndarray  # clean signal under the fused PSF, float32, ZYX
    mask: np.ndarray  # soft specimen occupancy in [0, 1], float32
    level2: np.ndarray  # squared ellipsoid level (0 at the centre, 1 on the surface)
    n_cells: int


# --------------------------------------------------------------------------- geometry


def specimen_geometry(params: SimulationParams) -> tuple[np.ndarray, np.ndarray]:
    """Centre and semi-axes (um) of the specimen ellipsoid for these parameters."""
    half = np.asarray(params.shape, float) * np.asarray(params.spacing) / 2.0
    base = half.min() * params.radius_fraction
    radii = np.minimum(base * np.asarray(params.aspect), 1.1 * half)
    radii = np.maximum(radii, 1e-3)
    center = half * (1.0 + np.asarray(params.center_shift))
    return center, radii


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random rotation matrices (n, 3, 3) from normalised Gaussian quaternions."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def _cell_seeds(rng: np.random.Generator, params: SimulationParams, center, radii) -> np.ndarray:
    """Cell centres (n, 3) in um: a rotated, jittered cubic lattice clipped to the ellipsoid.

    A jittered lattice packs cells of similar size, as in an embryo, unlike uniform random seeds.
    """
    s = params.cell_spacing_um
    reach = float(radii.max()) + s
    n = math.ceil(reach / s) + 1
    axis = (np.arange(-n, n + 1) * s).astype(np.float64)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid += rng.uniform(0.0, s, size=3)
    grid += rng.uniform(-params.seed_jitter * s, params.seed_jitter * s, size=grid.shape)
    grid = grid @ _random_rotations(rng, 1)[0].T + center
    level = np.sqrt((((grid - center) / radii) ** 2).sum(1))
    seeds = grid[level < 1.0 - 0.4 * s / float(radii.min())]  # nuclei stay inside the specimen
    if len(seeds) < 2:  # tiny specimen: still two cells so every channel has structure
        offset = np.array([0.0, 0.0, 0.25 * min(s, float(radii.min()))])
        seeds = np.stack([center - offset, center + offset])
    return seeds


def _nucleus_tables(rng: np.random.Generator, params: SimulationParams, seeds: np.ndarray, tree: cKDTree):
    """Per-cell nucleus centre (n,3), quadratic form (n,6) with r^2 = o^T Q o, and brightness (n,).

    Size follows the cell's mean distance to its neighbours (its size); a ball of less than half
    the nearest-neighbour distance around the seed lies inside the Voronoi cell, which caps it.
    """
    n = len(seeds)
    dist = tree.query(seeds, k=min(7, n))[0][:, 1:]
    nn, local = dist[:, 0], dist.mean(1)
    mitotic = rng.random(n) < params.mitotic_fraction
    size = np.exp(params.nucleus_size_spread * rng.standard_normal(n))
    radius = 0.5 * local * params.nucleus_fraction * np.where(mitotic, 0.7, 1.0) * size
    spread = np.where(mitotic, 0.45, params.nucleus_aspect_spread)[:, None]
    log_axes = spread * rng.standard_normal((n, 3))
    axes = radius[:, None] * np.exp(log_axes - log_axes.mean(1, keepdims=True))
    axes = np.minimum(axes, 0.47 * nn[:, None])  # stay inside the cell
    room = np.maximum(0.47 * nn - axes.max(1), 0.0)
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
    centres = seeds + direction * (room * rng.random(n))[:, None]
    rot = _random_rotations(rng, n)
    q = np.einsum("nij,nj,nkj->nik", rot, 1.0 / axes**2, rot)
    quad = np.stack([q[:, 0, 0], q[:, 1, 1], q[:, 2, 2], q[:, 0, 1], q[:, 0, 2], q[:, 1, 2]], 1)
    bright = np.exp(params.brightness_spread * rng.standard_normal(n)) * np.where(mitotic, 1.8, 1.0)
    bright /= np.percentile(bright, 95)
    return centres.astype(np.float32), quad.astype(np.float32), bright.astype(np.float32)


def _pair_tables(params: SimulationParams, seeds, cand, psf_var, membrane_bright):
    """For each coarse block and candidate pair (a, b): 1 / (4 L^2 s^2) and log peak of the membrane.

    The distance from a point p in cell a to the bisector plane with cell b is
    (|p-s_b|^2 - |p-s_a|^2) / (2 L), L = |s_b - s_a|; under a Gaussian PSF a sheet of width w has
    along its normal n the sigma s^2 = w^2 + sum n_k^2 psf_k^2 and a peak w / s.
    """
    sc = seeds[cand]  # (..., k, 3) float32
    diff2 = (sc[..., None, :, :] - sc[..., :, None, :]) ** 2  # (..., a, b, 3), (s_b - s_a)^2
    l2 = diff2.sum(-1)
    same = l2 <= 0
    l2[same] = 1.0
    w2 = np.float32(params.membrane_width_um**2)
    sig2 = w2 + (diff2 * psf_var.astype(np.float32)).sum(-1) / l2
    table = np.empty((*l2.shape, 2), np.float32)
    table[..., 0] = 1.0 / (4.0 * l2 * sig2)
    bright = membrane_bright[cand]
    peak = np.sqrt(w2 / sig2) * 0.5 * (bright[..., :, None] + bright[..., None, :])
    table[..., 1] = np.log(np.maximum(peak, np.float32(1e-30)))
    table[same] = (0.0, -np.inf)  # a cell has no membrane with itself
    return table  # (..., a, b, [inv, logpeak])


def _render_cells(params: SimulationParams, rng: np.random.Generator, seeds: np.ndarray) -> np.ndarray:
    """Nuclei or interior membranes of the Voronoi cells, PSF applied analytically, float32 ZYX.

    Voxels are labelled blockwise: for each coarse block (~cell_spacing/4 on a side) the k nearest
    cell centres are candidates, and every fine voxel of the block picks among those. The fine grid
    is viewed as (Cz, bz, Cy, by, Cx, bx) so that all work is broadcasting, no per-voxel gathers of
    coordinates, processed in slabs of coarse rows to stay in cache.
    """
    shape = np.asarray(params.shape)
    spacing = np.asarray(params.spacing)
    block = np.maximum(1, np.round(params.cell_spacing_um / 4.0 / spacing)).astype(int)
    coarse = -(-shape // block)
    cz, cy, cx = (int(c) for c in coarse)
    bz, by, bx = (int(b) for b in block)
    k = int(min(params.candidates, len(seeds)))

    tree = cKDTree(seeds)
    centres_idx = np.stack(np.meshgrid(*[np.arange(c) for c in coarse], indexing="ij"), -1).reshape(-1, 3)
    block_centres = (centres_idx * block + (block - 1) / 2.0) * spacing
    cand = tree.query(block_centres, k=k)[1].reshape(cz, cy, cx, k).astype(np.intp)

    psf_var = _psf_variance(params)
    sig = np.sqrt(psf_var).astype(np.float32)
    seeds32 = seeds.astype(np.float32)
    membrane = params.channel == "membrane"
    if membrane:
        bright = np.exp(params.brightness_spread * rng.standard_normal(len(seeds)))
        membrane_bright = (bright / np.percentile(bright, 95)).astype(np.float32)
    else:
        centres, quad, bright = _nucleus_tables(rng, params, seeds, tree)
        edge2 = np.float32(params.edge_um**2)

    out = np.empty((cz, bz, cy, by, cx, bx), np.float32)
    pz_all = (np.arange(cz * bz) * spacing[0]).astype(np.float32).reshape(cz, bz, 1, 1, 1, 1, 1)
    py = (np.arange(cy * by) * spacing[1]).astype(np.float32).reshape(1, 1, cy, by, 1, 1, 1)
    px = (np.arange(cx * bx) * spacing[2]).astype(np.float32).reshape(1, 1, 1, 1, cx, bx, 1)
    per_row = bz * cy * by * cx * bx * k
    step = max(1, int(2_000_000 // per_row))
    cand_flat = cand.reshape(-1)
    for c0 in range(0, cz, step):
        c1 = min(cz, c0 + step)
        cc = cand[c0:c1]
        s = seeds32[cc]  # (n, Cy, Cx, k, 3)
        sz, sy, sx = (s[..., i][:, None, :, None, :, None, :] for i in range(3))
        pz = pz_all[c0:c1]
        d2 = (pz - sz) ** 2 + (py - sy) ** 2 + (px - sx) ** 2  # (n, bz, Cy, by, Cx, bx, k)
        a = d2.argmin(-1)
        # index of (block, a): np.take on flat tables is far faster than take_along_axis
        blk = np.arange(c0 * cy * cx, c1 * cy * cx).reshape(c1 - c0, 1, cy, 1, cx, 1)
        if membrane:
            table = _pair_tables(params, seeds32, cc, psf_var, membrane_bright).reshape(-1, 2 * k)
            row = (blk - c0 * cy * cx) * k + a  # row = block * k + a, holding (b, [inv, logpeak])
            dmin = np.take_along_axis(d2, a[..., None], -1)
            rows = np.take(table, row, axis=0).reshape(*row.shape, k, 2)
            value = rows[..., 1] - 0.5 * (d2 - dmin) ** 2 * rows[..., 0]
            out[c0:c1] = np.exp(value.max(-1))
        else:
            # the nearest and second-nearest cell's nuclei: a blurred nucleus close to its cell
            # boundary would otherwise have its tail cut off by the labelling
            value = _nucleus_value(
                np.take(cand_flat, blk * k + a), pz, py, px, centres, quad, bright, sig, edge2
            )
            if k > 1:
                np.put_along_axis(d2, a[..., None], np.inf, -1)
                second = np.take(cand_flat, blk * k + d2.argmin(-1))
                value += _nucleus_value(second, pz, py, px, centres, quad, bright, sig, edge2)
            out[c0:c1] = value
    full = out.reshape(cz * bz, cy * by, cx * bx)
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


def _nucleus_value(label, pz, py, px, centres, quad, bright, sig, edge2) -> np.ndarray:
    """Blurred ellipsoidal nucleus of cell ``label`` at each voxel (positions broadcast, um)."""
    oz = pz[..., 0] - np.take(centres[:, 0], label)
    oy = py[..., 0] - np.take(centres[:, 1], label)
    ox = px[..., 0] - np.take(centres[:, 2], label)
    q = np.take(quad, label, axis=0)
    r2 = (
        q[..., 0] * oz * oz
        + q[..., 1] * oy * oy
        + q[..., 2] * ox * ox
        + 2.0 * (q[..., 3] * oz * oy + q[..., 4] * oz * ox + q[..., 5] * oy * ox)
    )
    o2 = oz * oz + oy * oy + ox * ox + np.float32(1e-12)
    # signed distance to the surface along the ray from the centre, and the PSF's sigma along
    # that direction: the edge profile of a blurred step
    dist = np.sqrt(o2) * (1.0 - 1.0 / np.sqrt(np.maximum(r2, np.float32(1e-12))))
    sig_n = np.sqrt(((oz * sig[0]) ** 2 + (oy * sig[1]) ** 2 + (ox * sig[2]) ** 2) / o2 + edge2)
    return np.take(bright, label) * special.erfc(dist / (np.float32(_SQRT2) * sig_n)) * np.float32(0.5)


def _psf_variance(params: SimulationParams) -> np.ndarray:
    """Per-axis variance (um^2) of the fused PSF, plus the camera pixel's box integration in y, x."""
    var = np.asarray(params.fused_sigma_um, float) ** 2
    var[1:] += np.asarray(params.spacing[1:]) ** 2 / 12.0
    return var


def _axis_coords(params: SimulationParams, center) -> list[np.ndarray]:
    """Physical coordinates relative to ``center``, shaped to broadcast along each axis."""
    out = []
    for ax in range(3):
        c = (np.arange(params.shape[ax]) * params.spacing[ax] - center[ax]).astype(np.float32)
        view = [1, 1, 1]
        view[ax] = -1
        out.append(c.reshape(view))
    return out


def _texture(params: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Smooth unit-variance random field: chromatin / membrane patchiness, already PSF blurred."""
    noise = rng.standard_normal(params.shape, dtype=np.float32)
    sigma = np.sqrt(params.texture_scale_um**2 + _psf_variance(params)) / np.asarray(params.spacing)
    field = ndimage.gaussian_filter(noise, sigma, truncate=3.0)
    std = float(field.std())
    return field / std if std > 0 else field


def render_specimen(params: SimulationParams, rng: np.random.Generator) -> Specimen:
    """The clean specimen under the fused PSF on the output grid (float32, peak about 1)."""
    center, radii = specimen_geometry(params)
    seeds = _cell_seeds(rng, params, center, radii)
    cells = _render_cells(params, rng, seeds)

    # specimen envelope: first-order signed distance to the ellipsoid and the PSF along its normal
    z, y, x = _axis_coords(params, center)
    rz, ry, rx = (np.float32(r) for r in radii)
    level2 = (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2
    gz, gy, gx = z / rz**2, y / ry**2, x / rx**2
    grad2 = gz**2 + gy**2 + gx**2
    # first-order distance (f - 1) / |grad f| with f = sqrt(level2), |grad f| = sqrt(grad2) / f;
    # the eps makes the ratio f^2 / |grad| tend to the smallest radius at the very centre
    eps = np.float32(1e-12)
    ratio = np.sqrt((level2 + eps) / (grad2 + eps / np.float32(radii.min()) ** 2))
    dist = (np.sqrt(level2) - 1.0) * ratio
    var = _psf_variance(params).astype(np.float32)
    sig2_n = (gz**2 * var[0] + gy**2 * var[1] + gx**2 * var[2] + eps) / (grad2 + eps) + np.float32(1e-6)
    mask = 0.5 * special.erfc(dist / np.sqrt(2.0 * sig2_n))
    mask = mask.astype(np.float32)

    tex = _texture(params, rng)
    if params.channel == "membrane":
        sig2_env = sig2_n + np.float32(params.membrane_width_um**2)
        envelope = (
            params.envelope_brightness
            * params.membrane_width_um
            / np.sqrt(sig2_env)
            * np.exp(-0.5 * dist**2 / sig2_env)
        )
        structure = np.maximum(cells * mask, envelope)
    else:
        structure = cells * mask
    structure *= np.maximum(1.0 + params.texture_amplitude * tex, 0.0)
    render = structure + params.cytoplasm_level * mask * np.maximum(1.0 + 0.5 * tex, 0.0)
    render += np.float32(params.background_level)
    return Specimen(center, radii, render.astype(np.float32), mask, level2.astype(np.float32), len(seeds))


# --------------------------------------------------------------------------- degradation


def _cumulative(volume: np.ndarray, axis: int, from_end: bool, step: float) -> np.ndarray:
    """Path integral along ``axis`` starting at the entrance side (um-weighted)."""
    if from_end:
        volume = np.flip(volume, axis)
    out = np.cumsum(volume, axis=axis, dtype=np.float32) * np.float32(step)
    return np.flip(out, axis) if from_end else out


def _wide_blur(volume: np.ndarray, sigma_um: float, spacing: np.ndarray) -> np.ndarray:
    """Gaussian blur with a sigma of many voxels, done on a block-averaged copy and upsampled."""
    factor = np.maximum(1, np.floor(sigma_um / 3.0 / spacing)).astype(int)
    factor = np.minimum(factor, np.asarray(volume.shape))
    padded_shape = -(-np.asarray(volume.shape) // factor) * factor
    pad = [(0, int(p - s)) for p, s in zip(padded_shape, volume.shape, strict=True)]
    padded = np.pad(volume, pad, mode="edge")
    fz, fy, fx = (int(f) for f in factor)
    small = padded.reshape(padded.shape[0] // fz, fz, padded.shape[1] // fy, fy, padded.shape[2] // fx, fx)
    small = small.mean(axis=(1, 3, 5), dtype=np.float32)
    small = ndimage.gaussian_filter(small, sigma_um / (spacing * factor), mode="nearest", truncate=3.0)
    big = ndimage.zoom(small, factor, order=1, mode="nearest", grid_mode=True)
    return big[: volume.shape[0], : volume.shape[1], : volume.shape[2]]


def _depth_blur(volume: np.ndarray, depth: np.ndarray, params: SimulationParams) -> np.ndarray:
    """Blur whose sigma grows with ``depth`` in [0, 1]: linear blend of a cascade of blur levels."""
    spacing = np.asarray(params.spacing)
    surface = np.asarray(params.blur_surface_um, float)
    deep = np.maximum(np.asarray(params.blur_deep_um, float), surface)
    levels = params.blur_levels
    pos = depth * np.float32(levels - 1)
    out = np.zeros_like(volume)
    current, prev_sigma = volume, np.zeros(3)
    for i in range(levels):
        sigma = surface + (deep - surface) * i / (levels - 1)
        step = np.sqrt(np.maximum(sigma**2 - prev_sigma**2, 0.0)) / spacing
        current = ndimage.gaussian_filter(current, step, truncate=3.0) if step.max() > 0.05 else current
        prev_sigma = sigma
        weight = np.maximum(1.0 - np.abs(pos - np.float32(i)), 0.0)
        out += weight * current
    return out


def _axis_fraction(params: SimulationParams, axis: int, from_end: bool) -> np.ndarray:
    """Voxel position along ``axis`` as a fraction of the field, 0 at the entrance side; broadcastable."""
    n = params.shape[axis]
    u = (np.arange(n, dtype=np.float32) + 0.5) / np.float32(n)
    if from_end:
        u = u[::-1].copy()
    view = [1, 1, 1]
    view[axis] = n
    return u.reshape(view)


def _sheet_divergence(params: SimulationParams) -> np.ndarray | float:
    """Extra blur depth from a Gaussian-beam sheet: w(u)^2 = w0^2 (1 + ((u - waist) / z_R)^2), so the
    axial blur variance grows quadratically away from the waist along the illumination axis."""
    if params.sheet_growth <= 0:
        return 0.0
    u = _axis_fraction(params, params.illumination_axis, params.illumination_from_end)
    off = (u - np.float32(params.sheet_waist)) / np.float32(max(params.sheet_waist, 1 - params.sheet_waist))
    return np.float32(params.sheet_growth) * off * off


def _illumination_profile(params: SimulationParams, rng: np.random.Generator) -> np.ndarray | float:
    """Multiplicative lit-field profile: the sheet's Gaussian height profile across the other lateral
    axis times a smooth log-normal field (uneven illumination). 1.0 when both are off.

    The random field is drawn only when it is on, so pairs without it keep their bytes.
    """
    profile: np.ndarray | float = 1.0
    if params.beam_height_fraction > 0:
        other = 1 if params.illumination_axis == 2 else 2
        v = _axis_fraction(params, other, False) * 2.0 - 1.0
        profile = np.exp(-2.0 * (v / np.float32(params.beam_height_fraction)) ** 2)
    if params.uneven_illumination > 0:
        coarse = tuple(
            max(2, math.ceil(n * s / params.uneven_scale_um) + 1)
            for n, s in zip(params.shape, params.spacing, strict=True)
        )
        field = rng.standard_normal(coarse).astype(np.float32)
        zoom = [n / c for n, c in zip(params.shape, coarse, strict=True)]
        smooth = ndimage.zoom(field, zoom, order=3, mode="nearest", grid_mode=True)
        smooth = smooth[: params.shape[0], : params.shape[1], : params.shape[2]]
        smooth /= max(float(smooth.std()), 1e-6)
        profile = profile * np.exp(np.float32(params.uneven_illumination) * smooth)
    return profile


def simulate_pair(params: SimulationParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one (angle, fused) pair: two uint16 ZYX volumes of ``params.shape``.

    The same ``params`` and ``seed`` always give the same bytes.
    """
    rng = np.random.default_rng(seed)
    return degrade_specimen(params, render_specimen(params, rng), rng)


def degrade_specimen(
    params: SimulationParams, spec: Specimen, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The fused target and the single view of ``spec``, by this family's physics: two uint16 volumes.

    Apart from :func:`simulate_pair` so that a specimen from elsewhere (a real volume,
    :mod:`fmc.real_structures`) goes through the same degradation.
    """
    spacing = np.asarray(params.spacing)
    render, mask = spec.render, spec.mask

    # fused: mild residual core dimming, high photon count, small read noise; like a microscopist,
    # lower the exposure rather than saturate the camera
    fused_signal = render * (1.0 - params.fused_attenuation * np.clip(1.0 - spec.level2, 0.0, 1.0))
    peak = max(float(render.max()), 1e-6)
    fused_photons = min(
        params.fused_photons, 0.85 * (65535 - params.fused_offset) / (params.fused_gain * peak)
    )
    photons_f = fused_photons * fused_signal
    noise_sd = np.sqrt(params.fused_gain**2 * photons_f + params.fused_read_noise**2)
    fused = params.fused_offset + params.fused_gain * photons_f
    fused += noise_sd * rng.standard_normal(params.shape, dtype=np.float32)

    # angle: illumination enters along one lateral axis, absorbed by tissue and by bright structures
    ill_axis = params.illumination_axis
    inside = float(mask.sum())
    mean_signal = float((render * mask).sum()) / inside if inside > 0 else 1.0
    absorber = mask + params.stripe_strength * render / max(mean_signal, 1e-6)
    ill_step = spacing[ill_axis]
    ill_path = _cumulative(mask, ill_axis, params.illumination_from_end, ill_step)
    emission = render * np.exp(
        -params.attenuation_illumination_per_um
        * _cumulative(absorber, ill_axis, params.illumination_from_end, ill_step)
    )
    det_path = _cumulative(mask, 0, params.detection_from_end, spacing[0])
    w = params.depth_weight_detection
    depth = w * det_path / np.float32(2 * spec.radii[0]) + (1 - w) * ill_path / np.float32(
        2 * spec.radii[ill_axis]
    )
    depth = np.clip(depth + _sheet_divergence(params), 0.0, 1.0).astype(np.float32)
    emission *= _illumination_profile(params, rng)

    signal = _depth_blur(emission, depth, params)
    if params.haze_fraction > 0:
        haze = _wide_blur(emission, params.haze_sigma_um, spacing)
        signal += params.haze_fraction * (0.3 + 0.7 * depth) * haze
    signal *= np.exp(-params.attenuation_detection_per_um * det_path)

    exposure = min(params.photons, 0.85 * (65535 - params.offset) / (params.gain * peak))
    photons = exposure * signal + params.ambient_photons
    counts = rng.poisson(np.maximum(photons, 0.0)).astype(np.float32)
    angle = params.offset + params.gain * counts
    angle += params.read_noise * rng.standard_normal(params.shape, dtype=np.float32)
    return clip_to_uint16(angle), clip_to_uint16(fused)


# --------------------------------------------------------------------------- randomization


#: The two degradation regimes of both simulated families. "calibrated": single views as close
#: to their fused truth as the real challenge data (docs/simulation.md, "Regimes": SSIM(input,
#: fused) near 0.78 nucleus / 0.70 membrane, the two-step paper's Table 1); "harsh": dim, deep,
#: strongly blurred views (SSIM 0.1-0.4), the regime the project first trained in.
REGIMES = ("calibrated", "harsh")


@dataclass(frozen=True)
class DegradationRanges:
    """Ranges :func:`random_params` draws one view's degradation from (uniform unless said)."""

    transmission_detection: tuple[float, float]  # log-uniform: light left after the whole depth
    transmission_illumination: tuple[float, float]  # log-uniform
    axial_surface_um: tuple[float, float]  # extra axial blur sigma at the surface
    lateral_surface_um: tuple[float, float]
    axial_growth_um: tuple[float, float]  # added with depth
    lateral_growth_um: tuple[float, float]
    haze_fraction: tuple[float, float]
    stripe_strength: tuple[float, float]
    sheet_growth: tuple[float, float]
    uneven_illumination: tuple[float, float]
    photons: tuple[float, float]  # log-uniform: photons per unit signal at the surface
    read_noise: tuple[float, float]


#: Keyed "harsh" (both channels) and "calibrated-<channel>": thin membranes lose more to the same
#: blur than nuclei, so the calibrated regime blurs the membrane channel less to meet its target.
#: One row per field, one column per key, so the regimes read side by side.
_DEGRADATION_KEYS = ("harsh", "calibrated-nucleus", "calibrated-membrane")
_DEGRADATION_TABLE: dict[str, tuple[tuple[float, float], ...]] = {
    "transmission_detection": ((0.08, 0.7), (0.35, 0.9), (0.35, 0.9)),
    "transmission_illumination": ((0.1, 0.8), (0.4, 0.9), (0.4, 0.9)),
    "axial_surface_um": ((0.8, 2.0), (0.3, 1.0), (0.3, 0.9)),
    "lateral_surface_um": ((0.0, 0.15), (0.0, 0.06), (0.0, 0.04)),
    "axial_growth_um": ((0.8, 4.0), (0.2, 1.4), (0.2, 1.2)),
    "lateral_growth_um": ((0.25, 1.2), (0.02, 0.3), (0.02, 0.2)),
    "haze_fraction": ((0.05, 0.5), (0.02, 0.15), (0.02, 0.12)),
    "stripe_strength": ((0.0, 0.5), (0.0, 0.25), (0.0, 0.2)),
    "sheet_growth": ((0.0, 0.6), (0.0, 0.3), (0.0, 0.25)),
    "uneven_illumination": ((0.0, 0.35), (0.0, 0.15), (0.0, 0.12)),
    "photons": ((25.0, 2000.0), (400.0, 6000.0), (400.0, 6000.0)),
    "read_noise": ((1.0, 10.0), (1.0, 4.0), (1.0, 4.0)),
}
DEGRADATION: dict[str, DegradationRanges] = {
    key: DegradationRanges(**{name: row[column] for name, row in _DEGRADATION_TABLE.items()})
    for column, key in enumerate(_DEGRADATION_KEYS)
}


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def random_params(
    rng: np.random.Generator, channel: str, shape: Shape3 = (64, 256, 256), regime: str = "calibrated"
) -> SimulationParams:
    """Draw parameters for training (domain randomization) on a fixed output ``shape``.

    Three in five pairs take a real study's spacing (membrane: studies 1 and 3 only) and record that
    study; the rest take a random spacing (z 1-3.5 um, xy 0.195-0.4 um) and no study. The
    specimen is drawn the same way in both :data:`REGIMES`; the view's degradation from
    :data:`DEGRADATION` of ``regime``.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    ranges = DEGRADATION["harsh" if regime == "harsh" else f"calibrated-{channel}"]
    studies = MEMBRANE_STUDIES if channel == "membrane" else tuple(STUDY_SPACINGS)
    if rng.random() < 0.6:
        study: int | None = int(rng.choice(studies))
        spacing = STUDY_SPACINGS[study]
    else:
        study = None
        dxy = float(rng.uniform(0.195, 0.4))
        spacing = (float(rng.uniform(1.0, 3.5)), dxy, dxy)
    p = SimulationParams(
        shape=tuple(int(s) for s in shape),
        spacing=spacing,
        channel=channel,
        study=study,
        radius_fraction=float(rng.uniform(0.7, 1.05)),
        aspect=tuple(float(a) for a in np.exp(0.12 * rng.standard_normal(3))),
        center_shift=tuple(float(c) for c in rng.uniform(-0.08, 0.08, 3)),
    )
    _, radii = specimen_geometry(p)
    # at least ~4 cells across the specimen's smallest diameter
    cell = min(float(rng.uniform(5.5, 11.0)), 2 * float(radii.min()) / 4.0)
    lateral = float(rng.uniform(0.22, 0.35))
    ill_axis = int(rng.choice([2, 1]))
    ax_surface = float(rng.uniform(*ranges.axial_surface_um))
    lat_surface = float(rng.uniform(*ranges.lateral_surface_um))
    ax_deep = ax_surface + float(rng.uniform(*ranges.axial_growth_um))
    lat_deep = lat_surface + float(rng.uniform(*ranges.lateral_growth_um))
    transmission_det = _log_uniform(rng, ranges.transmission_detection)
    transmission_ill = _log_uniform(rng, ranges.transmission_illumination)
    return dataclasses.replace(
        p,
        cell_spacing_um=max(cell, 2.0),
        seed_jitter=float(rng.uniform(0.15, 0.4)),
        nucleus_fraction=float(rng.uniform(0.6, 0.9)),
        nucleus_size_spread=float(rng.uniform(0.05, 0.25)),
        nucleus_aspect_spread=float(rng.uniform(0.05, 0.3)),
        mitotic_fraction=float(rng.uniform(0.0, 0.06)),
        membrane_width_um=float(rng.uniform(0.15, 0.35)),
        envelope_brightness=float(rng.uniform(0.6, 1.5)),
        brightness_spread=float(rng.uniform(0.15, 0.5)),
        edge_um=float(rng.uniform(0.08, 0.3)),
        texture_amplitude=float(rng.uniform(0.1, 0.5)),
        texture_scale_um=float(rng.uniform(0.4, 1.0)),
        cytoplasm_level=float(rng.uniform(0.02, 0.1) if channel == "nucleus" else rng.uniform(0.04, 0.15)),
        background_level=float(rng.uniform(0.0, 0.03)),
        fused_sigma_um=(float(rng.uniform(0.45, 0.9)), lateral, lateral),
        fused_attenuation=float(rng.uniform(0.0, 0.3)),
        illumination_axis=ill_axis,
        illumination_from_end=bool(rng.random() < 0.5),
        detection_from_end=bool(rng.random() < 0.5),
        attenuation_detection_per_um=-math.log(transmission_det) / (2 * float(radii[0])),
        attenuation_illumination_per_um=-math.log(transmission_ill) / (2 * float(radii[ill_axis])),
        stripe_strength=float(rng.uniform(*ranges.stripe_strength)),
        depth_weight_detection=float(rng.uniform(0.5, 0.9)),
        blur_surface_um=(ax_surface, lat_surface, lat_surface),
        blur_deep_um=(ax_deep, lat_deep, lat_deep),
        haze_fraction=float(rng.uniform(*ranges.haze_fraction)),
        haze_sigma_um=float(rng.uniform(4.0, 14.0)),
        sheet_growth=float(rng.uniform(*ranges.sheet_growth)),
        sheet_waist=float(rng.uniform(0.2, 0.8)),
        beam_height_fraction=float(rng.uniform(0.8, 2.5)) if rng.random() < 0.5 else 0.0,
        uneven_illumination=float(rng.uniform(*ranges.uneven_illumination)),
        uneven_scale_um=float(rng.uniform(15.0, 60.0)),
        photons=_log_uniform(rng, ranges.photons),
        gain=float(rng.uniform(0.8, 2.0)),
        read_noise=float(rng.uniform(*ranges.read_noise)),
        offset=float(rng.choice([90.0, 100.0, 100.0, 110.0])),
        ambient_photons=float(rng.uniform(0.0, 5.0)),
        fused_photons=float(np.exp(rng.uniform(math.log(2000), math.log(20000)))),
        fused_gain=float(rng.uniform(0.5, 2.0)),
        fused_read_noise=float(rng.uniform(0.5, 2.0)),
        fused_offset=float(rng.choice([0.0, 100.0])),
    )


def pair_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per pair index, so pair i does not depend on how many pairs are made."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def random_pair(
    seed: int, index: int, channel: str, shape: Shape3 = (64, 256, 256), regime: str = "calibrated"
) -> tuple[np.ndarray, np.ndarray, SimulationParams]:
    """Pair ``index`` of the randomized stream ``seed``: (angle, fused, params), as write_dataset makes it.

    For training on the fly without files; the same (seed, index, channel, shape) gives the same bytes.
    """
    rng = pair_rng(seed, index)
    params = random_params(rng, channel, shape, regime)
    angle, fused = simulate_pair(params, int(rng.integers(2**63 - 1)))
    return angle, fused, params


def write_dataset(
    out: Path,
    n: int,
    channel: str,
    seed: int,
    shape: Shape3 = (64, 256, 256),
    regime: str = "calibrated",
    first_id: int = 0,
) -> list[Path]:
    """Write ``n`` randomized pairs as ``image_{i}_{channel}_{angle|fused}.tif`` plus a MIP PNG each.

    Metadata rotates through :data:`fmc.io.METADATA_STYLES` and the PhysicalSize key spellings (the
    fused file uses the next style, as real pairs sometimes differ). Parameters go to
    ``image_{i}_{channel}_params.json``. Returns every path written.
    """
    pair = lambda i: random_pair(seed, i, channel, shape, regime)  # noqa: E731
    return write_pairs(out, n, channel, pair, {"regime": regime}, first_id)


def sample_params() -> SimulationParams:
    """Parameters of the bundled sample case: the first calibrated nucleus draw of the stream
    :data:`SAMPLE_SEED` that takes study 1's spacing (a view as close to its truth as real data)."""
    for index in range(1000):
        params = random_params(pair_rng(SAMPLE_SEED, index), "nucleus", SAMPLE_SHAPE, "calibrated")
        if params.study == 1:
            return params
    raise RuntimeError("no study-1 draw in the sample stream")  # 1 in 8 draws is study 1


def make_sample_case(input_dir: Path, seed: int = 0) -> list[Path]:
    """Write the sample case: one nucleus angle file in ``input_dir`` (platform layout).

    Its fused ground truth goes to ``input_dir.parent / "ground_truth"`` under the same name with
    ``_angle`` -> ``_fused``, out of the input folder so inference sees one case. At 0.6 um
    isotropic it is 80 x 98 x 98 voxels, small enough for CPU inference in well under a minute.
    Returns [angle path, ground truth path].
    """
    from fmc.simulated_tiff import write_volume

    input_dir = Path(input_dir)
    params = sample_params()
    angle, fused = simulate_pair(params, seed)
    name = "image_0_nucleus_angle.tif"
    angle_path = input_dir / name
    truth_path = input_dir.parent / "ground_truth" / name.replace("_angle", "_fused")
    for path, volume in ((angle_path, angle), (truth_path, fused)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(
            path, volume, spacing=params.spacing, channel="nucleus", study=params.study, style="imagej"
        )
    return [angle_path, truth_path]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """CLI: write N simulated pairs of one channel."""
    parser = pair_parser(
        "python -m fmc.simulate",
        "Simulate single-view (angle) / multiview-fused lightsheet pairs of a packed-cell specimen "
        "and write them as image_{N}_{channel}_{angle|fused}.tif with study-like metadata, plus a "
        "maximum-intensity-projection PNG (input | target) and the parameters as JSON per pair.",
        shape=(64, 256, 256),
        regimes=REGIMES,
    )
    parser.add_argument("--channel", choices=CHANNELS, default="nucleus", help="stained structure")
    args = parse_pair_args(parser, argv)
    start = time.perf_counter()
    paths = write_dataset(
        args.out, args.n, args.channel, args.seed, tuple(args.shape), args.regime, args.first_id
    )
    seconds = time.perf_counter() - start
    log.info("%d pairs in %.1f s (%.2f s per pair) -> %s", args.n, seconds, seconds / args.n, args.out)
    print(f"wrote {len(paths)} files to {args.out} ({seconds / args.n:.2f} s per pair)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
