"""The held-out forward-model family: single-view / fused pairs made with other physics than fmc.simulate.

Why a second family: a model trained on one simulator learns that simulator's quirks, and a
table scored on the same simulator rewards them. These pairs are never trained on; they pick
checkpoints and fill the reported tables. The code shares nothing with :mod:`fmc.simulate`
but the file layout, and each physical effect is modelled differently:

* **specimen** -- cells are random seeds kept apart by a minimum distance (dart throwing, not a
  lattice); nuclei are blobs whose surface is bent by a smooth random field, with a dim
  nucleolus and speckled chromatin; membranes are where the two nearest seeds are nearly
  equidistant (distance difference, not the exact bisector distance), plus the specimen's
  own wavy surface. Rendered point-wise on a grid finer than the z step, then blurred.
* **fused target** -- a real multi-view fusion: two views, detected from opposite sides and lit
  from opposite sides, each attenuated and blurred by its own depth, blended voxel-wise with
  weights that favour the view that sees the voxel through less tissue. So the target keeps a
  mild, uneven dimming and blur in the core, as fused data does.
* **blur** -- a non-Gaussian optical transfer function applied in Fourier space: a Gaussian core
  times a heavy-tailed scattering term ``(1 - h) + h exp(-a |k|)`` (a Cauchy-like halo); both
  grow with depth in a few z slabs that cross-fade. The light sheet integrates over its
  thickness along z, and the z step samples the blurred object.
* **absorption** -- a heterogeneous absorption map (tissue density times a smooth random field,
  plus the nuclei's extra density) integrated along the illumination and the detection paths.
* **acquisition** -- photobleaching in acquisition order (plane by plane), a background of
  out-of-focus light with a gradient, and an sCMOS camera: per-pixel offset and gain maps,
  Poisson shot noise, per-pixel read noise with a few noisy pixels, and hot pixels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from fmc.pair_cli import pair_parser, parse_pair_args
from fmc.pair_files import write_pairs

Vec3 = tuple[float, float, float]
Shape3 = tuple[int, int, int]

#: The spacings this family draws from: the studies' own and random ones (um, z y x).
_STUDY_SPACINGS: tuple[Vec3, ...] = (
    (1.0, 0.195, 0.195),
    (1.0, 0.39, 0.39),
    (3.0, 0.33, 0.33),
    (1.01, 0.388, 0.388),
)
_MEMBRANE_STUDY_SPACINGS: tuple[Vec3, ...] = ((1.0, 0.195, 0.195), (1.0, 0.39, 0.39))


@dataclass
class HeldOutParams:
    """Every knob of one held-out pair (um, z y x)."""

    shape: Shape3
    spacing: Vec3
    channel: str
    cell_distance_um: float  # minimum distance between cell seeds
    specimen_fill: float  # specimen semi-axes / half the field
    surface_waviness: float  # relative radius modulation of the specimen surface
    nucleus_fraction: float  # nucleus radius / half the minimum seed distance
    blob_strength: float  # relative radius modulation of the nuclei
    membrane_width_um: float
    fused_sigma_um: Vec3  # the fused target's Gaussian core
    view_sigma_surface_um: Vec3  # one view's Gaussian core at the surface
    view_sigma_deep_um: Vec3  # and at the far side
    halo_surface: float  # fraction of light in the heavy-tailed scattering halo at the surface
    halo_deep: float
    halo_width_um: float  # scale a of the halo's exp(-a|k|) transfer
    absorption_per_um: float  # tissue absorption coefficient (1/um)
    nucleus_absorption: float  # extra absorption of nuclear material, relative to tissue
    bleach: float  # fraction of signal bleached by the last plane
    background: float  # out-of-focus background, relative to the signal's 99th percentile
    photons: float  # photons per unit signal in the angle view
    read_noise: float  # ADU
    offset: float  # ADU
    illumination_from_end: bool
    detection_from_end: bool
    study: ClassVar[None] = None  # spacings are drawn, never a real study's: the files name none

    def to_dict(self) -> dict:
        return asdict(self)


#: The degradation regimes (named as :data:`fmc.simulate.REGIMES`; this module shares no code
#: with that one, so the names are repeated). "calibrated": views as close to the truth as the real
#: data (docs/simulation.md, "Regimes"); "harsh": dim, deep, strongly blurred views.
REGIMES = ("calibrated", "harsh")


@dataclass(frozen=True)
class ViewRanges:
    """Uniform ranges of one view's degradation in a regime (photons log-uniform)."""

    surface_axial_um: tuple[float, float]
    axial_growth_um: tuple[float, float]  # deep minus surface Gaussian core
    lateral_growth_um: tuple[float, float]
    halo_surface: tuple[float, float]
    halo_deep: tuple[float, float]
    absorption_per_um: tuple[float, float]
    bleach: tuple[float, float]
    background: tuple[float, float]
    photons: tuple[float, float]
    read_noise: tuple[float, float]


#: One row per field, one column per regime (harsh, calibrated), so the two read side by side.
_VIEW_TABLE: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "surface_axial_um": ((1.0, 2.2), (0.6, 1.2)),
    "axial_growth_um": ((1.0, 3.0), (0.2, 1.2)),
    "lateral_growth_um": ((0.3, 1.0), (0.02, 0.25)),
    "halo_surface": ((0.05, 0.2), (0.01, 0.06)),
    "halo_deep": ((0.25, 0.6), (0.04, 0.15)),
    "absorption_per_um": ((0.005, 0.03), (0.002, 0.008)),
    "bleach": ((0.0, 0.35), (0.0, 0.15)),
    "background": ((0.01, 0.08), (0.005, 0.03)),
    "photons": ((40.0, 1500.0), (400.0, 6000.0)),
    "read_noise": ((1.5, 6.0), (1.0, 3.0)),
}
VIEW_RANGES: dict[str, ViewRanges] = {
    regime: ViewRanges(**{name: row[column] for name, row in _VIEW_TABLE.items()})
    for column, regime in enumerate(("harsh", "calibrated"))
}


#: Uniform ranges of the specimen, the same in both regimes (what the regime changes is the view).
SPECIMEN_RANGES: dict[str, tuple[float, float]] = {
    "cell_distance_um": (5.0, 9.0),
    "specimen_fill": (0.75, 1.0),
    "surface_waviness": (0.02, 0.1),
    "nucleus_fraction": (0.55, 0.85),
    "blob_strength": (0.05, 0.25),
    "membrane_width_um": (0.2, 0.4),
}


def draw_params(
    rng: np.random.Generator, channel: str, shape: Shape3, regime: str = "calibrated"
) -> HeldOutParams:
    """One random pair's parameters; ranges cover dim and bright, shallow and deep specimens.

    ``shape`` gives the lateral field and the most z planes: the planes cover a depth of 0.6-1.3
    times the lateral field, so coarse z steps mean fewer planes, as in a real stack. The specimen
    comes from :data:`SPECIMEN_RANGES`, the view's degradation from :data:`VIEW_RANGES` of ``regime``.
    """
    if regime not in VIEW_RANGES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    view = VIEW_RANGES[regime]
    spacings = _MEMBRANE_STUDY_SPACINGS if channel == "membrane" else _STUDY_SPACINGS
    if rng.random() < 0.7:
        spacing = spacings[int(rng.integers(len(spacings)))]
    else:
        dxy = float(rng.uniform(0.2, 0.4))
        spacing = (float(rng.uniform(1.0, 3.0)), dxy, dxy)
    depth_um = float(rng.uniform(0.6, 1.3)) * shape[1] * spacing[1]
    planes = int(np.clip(round(depth_um / spacing[0]), 16, shape[0]))
    axial = float(rng.uniform(0.5, 0.9))
    lateral = float(rng.uniform(0.22, 0.35))
    # never sharper than the fused target's core (a calibrated view's surface blur can start below it)
    surface_ax = max(axial, float(rng.uniform(*view.surface_axial_um)))
    specimen = {name: float(rng.uniform(*bounds)) for name, bounds in SPECIMEN_RANGES.items()}
    return HeldOutParams(
        shape=(planes, int(shape[1]), int(shape[2])),
        spacing=spacing,
        channel=channel,
        **specimen,
        fused_sigma_um=(axial, lateral, lateral),
        view_sigma_surface_um=(surface_ax, lateral + 0.05, lateral + 0.05),
        view_sigma_deep_um=(
            surface_ax + float(rng.uniform(*view.axial_growth_um)),
            lateral + float(rng.uniform(*view.lateral_growth_um)),
            lateral + float(rng.uniform(*view.lateral_growth_um)),
        ),
        halo_surface=float(rng.uniform(*view.halo_surface)),
        halo_deep=float(rng.uniform(*view.halo_deep)),
        halo_width_um=float(rng.uniform(1.0, 4.0)),
        absorption_per_um=float(rng.uniform(*view.absorption_per_um)),
        nucleus_absorption=float(rng.uniform(0.5, 2.0)),
        bleach=float(rng.uniform(*view.bleach)),
        background=float(rng.uniform(*view.background)),
        photons=float(math.exp(rng.uniform(math.log(view.photons[0]), math.log(view.photons[1])))),
        read_noise=float(rng.uniform(*view.read_noise)),
        offset=float(rng.choice([100.0, 100.0, 400.0])),
        illumination_from_end=bool(rng.random() < 0.5),
        detection_from_end=bool(rng.random() < 0.5),
    )


# ---------------------------------------------------------------------------------------- specimen


def _fine_grid(params: HeldOutParams) -> tuple[int, float]:
    """Planes per z step and the fine z step: thin structures are rendered below the z step."""
    factor = max(1, math.ceil(params.spacing[0] / 0.75))
    return factor, params.spacing[0] / factor


def _smooth_field(rng: np.random.Generator, shape: Shape3, scale_vox: Vec3) -> np.ndarray:
    """Unit-variance Gaussian random field with the given correlation length in voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale_vox, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _dart_seeds(
    rng: np.random.Generator, extent: np.ndarray, distance: float, tries: int = 20000
) -> np.ndarray:
    """Random points in a box kept ``distance`` apart (dart throwing with a k-d tree rebuilt in rounds)."""
    points = np.empty((0, 3))
    for _ in range(8):
        candidates = rng.uniform(0.0, 1.0, (tries // 8, 3)) * extent
        kept: list[np.ndarray] = []
        tree = cKDTree(points) if len(points) else None
        for c in candidates:
            if tree is not None and tree.query(c)[0] < distance:
                continue
            if kept and np.min(np.linalg.norm(np.asarray(kept) - c, axis=1)) < distance:
                continue
            kept.append(c)
        if kept:
            points = np.vstack([points, np.asarray(kept)])
    return points


def render_object(params: HeldOutParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Emitter density and absorption density on the fine grid (float32), and the fine z step."""
    factor, dz = _fine_grid(params)
    shape = (params.shape[0] * factor, params.shape[1], params.shape[2])
    step = np.array([dz, params.spacing[1], params.spacing[2]])
    extent = np.asarray(shape) * step
    centre = extent / 2
    radii = centre * params.specimen_fill * np.exp(0.1 * rng.standard_normal(3))
    z, y, x = (
        ((np.arange(n) + 0.5) * s - c).astype(np.float32) for n, s, c in zip(shape, step, centre, strict=True)
    )
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    wave = _smooth_field(rng, shape, tuple(8.0 / s for s in step))
    level = np.sqrt((z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2) * (
        1 + params.surface_waviness * wave
    )
    inside = level < 1.0

    seeds = _dart_seeds(rng, extent, params.cell_distance_um)
    seed_level = np.sqrt((((seeds - centre) / radii) ** 2).sum(1))
    seeds = seeds[seed_level < 0.95]
    if len(seeds) < 3:
        seeds = centre + rng.uniform(-0.3, 0.3, (3, 3)) * radii
    tree = cKDTree(seeds)
    coords = np.stack(
        np.meshgrid(*(((np.arange(n) + 0.5) * s) for n, s in zip(shape, step, strict=True)), indexing="ij"),
        -1,
    ).reshape(-1, 3)
    dist, label = tree.query(coords, k=2)
    d1 = dist[:, 0].reshape(shape).astype(np.float32)
    gap = (dist[:, 1] - dist[:, 0]).reshape(shape).astype(np.float32)
    nearest = label[:, 0].reshape(shape)
    brightness = np.exp(0.35 * rng.standard_normal(len(seeds))).astype(np.float32)
    texture = _smooth_field(rng, shape, tuple(0.4 / s for s in step))

    if params.channel == "nucleus":
        radius = 0.5 * params.cell_distance_um * params.nucleus_fraction
        radius_per_cell = (radius * np.exp(0.15 * rng.standard_normal(len(seeds)))).astype(np.float32)
        blob = _smooth_field(rng, shape, tuple(1.5 / s for s in step))
        r = d1 / radius_per_cell[nearest] * (1 + params.blob_strength * blob)
        nuclear = (r < 1.0).astype(np.float32)
        nucleolus = ((r < 0.3) & (texture > 0.5)).astype(np.float32)
        emitter = (
            nuclear * brightness[nearest] * (0.8 + 0.35 * np.clip(texture, -2, 2)) * (1 - 0.6 * nucleolus)
        )
        emitter = emitter * inside + 0.03 * inside
        absorber = inside * (1.0 + params.nucleus_absorption * nuclear)
    else:
        sheet = np.exp(-0.5 * (gap / (2.0 * params.membrane_width_um)) ** 2)
        surface = np.exp(-0.5 * ((level - 1.0) * float(radii.min()) / params.membrane_width_um) ** 2)
        emitter = np.maximum(sheet * inside, 0.8 * surface) * (0.75 + 0.25 * np.clip(texture, -2, 2))
        emitter = emitter * brightness[nearest] + 0.06 * inside
        absorber = inside.astype(np.float32)
    absorber = absorber * np.exp(0.3 * _smooth_field(rng, shape, tuple(10.0 / s for s in step)))
    return np.maximum(emitter, 0).astype(np.float32), absorber.astype(np.float32), dz


# ---------------------------------------------------------------------------------------- optics


def _transfer(
    shape: Shape3, step: np.ndarray, sigma_um: np.ndarray, halo: float, halo_um: float
) -> np.ndarray:
    """Optical transfer function (rfft layout): Gaussian core times a heavy-tailed scattering halo."""
    freqs = [
        np.fft.fftfreq(shape[0], step[0]),
        np.fft.fftfreq(shape[1], step[1]),
        np.fft.rfftfreq(shape[2], step[2]),
    ]
    kz, ky, kx = (2 * np.pi * f.astype(np.float32) for f in freqs)
    kz, ky, kx = kz[:, None, None], ky[None, :, None], kx[None, None, :]
    core = np.exp(-0.5 * ((sigma_um[0] * kz) ** 2 + (sigma_um[1] * ky) ** 2 + (sigma_um[2] * kx) ** 2))
    knorm = np.sqrt(kz**2 + ky**2 + kx**2)
    return (core * ((1 - halo) + halo * np.exp(-halo_um * knorm))).astype(np.float32)


def _depth_dependent_blur(
    volume: np.ndarray, depth: np.ndarray, step: np.ndarray, params: HeldOutParams, slabs: int = 4
) -> np.ndarray:
    """Blur whose transfer function follows ``depth`` in [0, 1] (per voxel): a few transfer functions,
    each applied to the whole volume, cross-faded by depth."""
    spectrum = np.fft.rfftn(volume)
    surface, deep = np.asarray(params.view_sigma_surface_um), np.asarray(params.view_sigma_deep_um)
    out = np.zeros_like(volume)
    position = depth * (slabs - 1)
    for i in range(slabs):
        t = i / (slabs - 1)
        otf = _transfer(
            volume.shape,
            step,
            surface + t * (deep - surface),
            params.halo_surface + t * (params.halo_deep - params.halo_surface),
            params.halo_width_um,
        )
        weight = np.clip(1.0 - np.abs(position - i), 0.0, 1.0)
        out += weight * np.fft.irfftn(spectrum * otf, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)
    return out


def _path_integral(density: np.ndarray, axis: int, from_end: bool, step: float) -> np.ndarray:
    """Optical path through ``density`` from the entrance side, up to (and half of) each voxel."""
    d = np.flip(density, axis) if from_end else density
    cumulative = (np.cumsum(d, axis=axis) - 0.5 * d) * step
    return (np.flip(cumulative, axis) if from_end else cumulative).astype(np.float32)


def _view(
    emitter: np.ndarray,
    absorber: np.ndarray,
    step: np.ndarray,
    params: HeldOutParams,
    ill_end: bool,
    det_end: bool,
    core_only: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One view: lit along x from one side, detected along z from one side; returns (image, depth)."""
    mu = params.absorption_per_um
    lit = np.exp(-mu * _path_integral(absorber, 2, ill_end, float(step[2])))
    through = np.exp(-mu * _path_integral(absorber, 0, det_end, float(step[0])))
    det_depth = _path_integral((absorber > 0.05).astype(np.float32), 0, det_end, float(step[0]))
    ill_depth = _path_integral((absorber > 0.05).astype(np.float32), 2, ill_end, float(step[2]))
    depth = np.clip(
        0.7 * det_depth / max(det_depth.max(), 1e-6) + 0.3 * ill_depth / max(ill_depth.max(), 1e-6), 0, 1
    )
    emission = emitter * lit
    if core_only:
        blurred = np.fft.irfftn(
            np.fft.rfftn(emission)
            * _transfer(emission.shape, step, np.asarray(params.fused_sigma_um), 0.0, 1.0),
            s=emission.shape,
            axes=(0, 1, 2),
        ).astype(np.float32)
    else:
        blurred = _depth_dependent_blur(emission, depth.astype(np.float32), step, params)
    return blurred * through, depth


def _sample_planes(fine: np.ndarray, factor: int) -> np.ndarray:
    """One plane per z step: the sheet-weighted mean of the fine planes around each step."""
    if factor == 1:
        return fine
    nz = fine.shape[0] // factor
    return fine[: nz * factor].reshape(nz, factor, *fine.shape[1:]).mean(1)


def simulate_heldout_pair(params: HeldOutParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(angle, fused) uint16 volumes of ``params.shape``; the same params and seed give the same bytes."""
    rng = np.random.default_rng(seed)
    emitter, absorber, dz = render_object(params, rng)
    factor, _ = _fine_grid(params)
    step = np.array([dz, params.spacing[1], params.spacing[2]])
    ill, det = params.illumination_from_end, params.detection_from_end

    angle_fine, _ = _view(emitter, absorber, step, params, ill, det, core_only=False)
    # fused: two opposite views, each with the fused core PSF, blended by how deep each voxel sits
    first, depth_a = _view(emitter, absorber, step, params, ill, det, core_only=True)
    second, depth_b = _view(emitter, absorber, step, params, not ill, not det, core_only=True)
    wa, wb = np.exp(-3.0 * depth_a), np.exp(-3.0 * depth_b)
    fused_fine = (wa * first + wb * second) / (wa + wb)

    angle = _sample_planes(angle_fine, factor)
    fused = _sample_planes(fused_fine, factor)
    nz = angle.shape[0]
    scale = 1.0 / max(float(np.percentile(fused, 99.5)), 1e-6)
    angle, fused = angle * scale, fused * scale

    # acquisition of the single view: bleaching plane by plane, out-of-focus background, sCMOS camera
    order = np.arange(nz, dtype=np.float32)[::-1] if det else np.arange(nz, dtype=np.float32)
    angle = angle * (1.0 - params.bleach * order / max(nz - 1, 1))[:, None, None]
    ny, nx = angle.shape[1:]
    gradient = np.linspace(0.6, 1.4, nx, dtype=np.float32)[None, None, :]
    angle = angle + params.background * gradient
    offset_map = params.offset + rng.normal(0.0, 2.0, (ny, nx)).astype(np.float32)
    gain_map = 1.0 + rng.normal(0.0, 0.03, (ny, nx)).astype(np.float32)
    read_map = np.where(rng.random((ny, nx)) < 0.005, 6.0, 1.0).astype(np.float32) * params.read_noise
    counts = rng.poisson(np.maximum(angle * params.photons, 0)).astype(np.float32)
    angle_adu = (
        offset_map + gain_map * counts + read_map * rng.standard_normal(angle.shape).astype(np.float32)
    )
    hot = rng.random(angle.shape) < 1e-4
    angle_adu[hot] += rng.uniform(500, 3000, int(hot.sum())).astype(np.float32)

    fused_photons = 20.0 * params.photons + 2000.0
    fused_adu = fused * fused_photons + rng.normal(0.0, 1.5, fused.shape).astype(np.float32) + 100.0
    to16 = lambda v: np.clip(np.rint(v), 0, 65535).astype(np.uint16)  # noqa: E731
    return to16(angle_adu), to16(fused_adu)


def heldout_pair(
    seed: int, index: int, channel: str, shape: Shape3, regime: str = "calibrated"
) -> tuple[np.ndarray, np.ndarray, HeldOutParams]:
    """Pair ``index`` of the stream ``seed``: independent of how many pairs are made."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
    params = draw_params(rng, channel, shape, regime)
    angle, fused = simulate_heldout_pair(params, int(rng.integers(2**63 - 1)))
    return angle, fused, params


def main(argv: list[str] | None = None) -> int:
    """CLI: write N held-out-family pairs of one channel."""
    parser = pair_parser(
        "python -m fmc.simulate_heldout",
        "Write single-view / fused pairs from the held-out forward-model family (never "
        "train on them): image_{N}_{channel}_{angle|fused}.tif plus the parameters as JSON.",
        shape=(64, 160, 160),
        regimes=REGIMES,
        shape_help="most z planes and the lateral field in voxels",
    )
    parser.add_argument(
        "--channel", choices=("nucleus", "membrane"), default="nucleus", help="stained structure"
    )
    args = parse_pair_args(parser, argv)
    start = time.perf_counter()
    # ImageJ metadata only, no MIP; --first-id only renames (pair i is the same whatever it is), so
    # held-out pairs can sit beside training pairs in one folder without clashing ids.
    shape = tuple(args.shape)
    pair = lambda i: heldout_pair(args.seed, i, args.channel, shape, args.regime)  # noqa: E731
    header = {"family": "heldout", "regime": args.regime}
    paths = write_pairs(
        args.out, args.n, args.channel, pair, header, args.first_id, every_style=False, mip=False
    )
    print(f"wrote {len(paths)} files to {args.out} ({(time.perf_counter() - start) / args.n:.2f} s per pair)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
