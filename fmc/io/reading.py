"""Reading a case: :func:`read_case` with its integrity checks (header, IFD chain, truncation,
dtype, shape, non-finite and constant volumes), :func:`list_cases`, :func:`fit_uint16_range`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fmc.io.case import TIFF_SUFFIXES, Case, CaseError, CaseMetadata
from fmc.io.metadata import collect_sources, raw_metadata
from fmc.io.spacing import SpacingResult, first_unit, resolve_channel, resolve_spacing, resolve_study
from fmc.memory import z_slabs
from fmc.method import TARGET_SPACING_UM
from fmc.normalization import UINT16_MAX

log = logging.getLogger("fmc.io")  # one logger for the whole package


# tifffile log lines that mean a damaged file (not "series metadata invalid", which it recovers from)
_CORRUPT = re.compile(
    r"offset|IFD|failed to read|suspicious number|truncat|unpack requires|corrupted tag|tag list",
    re.IGNORECASE,
)


class _TiffLogCapture(logging.Filter):
    """Collects tifffile's own log records raised by this thread (they reveal truncated files)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.messages.append(record.getMessage())
        return False  # reported through fmc.io instead, with the file name


@contextlib.contextmanager
def _capture_tifffile_log() -> Iterator[_TiffLogCapture]:
    logger = logging.getLogger("tifffile")
    capture = _TiffLogCapture()
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _broken_link_reason(path: Path) -> str:
    """Why a symbolic link leads nowhere: a missing target, or a loop of links (ELOOP)."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"symbolic link loop (it leads back to itself through {os.readlink(path)})"
    return f"broken symbolic link (its target {os.readlink(path)} does not exist)"


def _check_header(path: Path) -> int:
    """File size; raises CaseError for missing, empty, non-TIFF or cut-off headers."""
    if path.is_symlink() and not path.exists():
        raise CaseError(path, _broken_link_reason(path))
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CaseError(path, "is a folder, not a TIFF file")
        with path.open("rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise CaseError(path, "file not found") from None
    except OSError as exc:
        raise CaseError(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise CaseError(path, "empty file (0 bytes)")
    if len(head) < 4 and any(magic.startswith(head) for magic in _TIFF_MAGIC):
        raise CaseError(path, f"truncated TIFF file (only {size} bytes)")
    if head[:4] not in _TIFF_MAGIC:
        raise CaseError(path, "not a TIFF file (no TIFF header)")
    if size < (16 if head[2] == 0x2B or head[3] == 0x2B else 8) + 2:
        raise CaseError(path, f"truncated TIFF file (only {size} bytes)")
    return size


def _series_data_end(series: tifffile.TiffPageSeries) -> int:
    """Last byte the series' pixel data needs (to spot files cut short)."""
    if series.dataoffset is not None:
        return int(series.dataoffset) + int(series.nbytes)
    end = 0
    for page in series.pages:
        if page is None:
            continue
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count:
                end = max(end, int(offset) + int(count))
    return end


def _squeeze_to_3d(path: Path, shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Target ZYX shape; raises CaseError for 2-D and for 4-D+ with non-singleton extra axes."""
    if len(shape) < 3:
        raise CaseError(path, f"2-D image (shape {tuple(shape)}), expected a 3-D ZYX stack")
    if len(shape) > 3:
        kept = [n for n in shape if n != 1]
        if len(kept) > 3:
            raise CaseError(
                path,
                f"{len(shape)}-D image (shape {tuple(shape)}, axes {axes}): more than 3 non-singleton axes",
            )
        shape = tuple([1] * (3 - len(kept)) + kept)
    if 1 in shape:
        raise CaseError(
            path, f"2-D image (shape {tuple(shape)} has a single-voxel axis), expected a 3-D ZYX stack"
        )
    return tuple(shape)


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if dtype.kind == "c":
        raise CaseError(path, f"unsupported dtype {dtype.name} (complex)")
    if dtype.kind == "b":
        raise CaseError(path, "unsupported dtype bool (binary mask)")
    if dtype.kind not in "uif":
        raise CaseError(path, f"unsupported dtype {dtype}")


def zero_non_finite_(volume: np.ndarray) -> int:
    """Set NaN/Inf voxels to 0 in place, slab by slab (no full-size temporaries); returns the count."""
    count = 0
    for zs in z_slabs(volume):
        slab = volume[zs]
        bad = ~np.isfinite(slab)
        n = int(np.count_nonzero(bad))
        if n:
            slab[bad] = 0
            count += n
    return count


def _is_constant(volume: np.ndarray) -> bool:
    """Cheap for normal data: one plane with two values already answers it."""
    first = volume.reshape(-1)[0]
    if volume[0].min() != volume[0].max():
        return False
    return all(bool(np.all(volume[zs] == first)) for zs in z_slabs(volume))


def _ifd_chain_problem(tif: tifffile.TiffFile) -> str | None:
    """Why the IFD chain ends early, or None: the last page tifffile kept must point to no further IFD.

    tifffile stops quietly (it only logs) at a next-IFD offset past the end of a cut file, and
    shaped/ImageJ series need only the first page, so without this a file cut between IFDs reads
    "fine". Does not depend on logging being enabled.
    """
    header, handle = tif.tiff, tif.filehandle
    last = tif.pages[-1]
    handle.seek(last.offset)
    raw_count = handle.read(header.tagnosize)
    if len(raw_count) < header.tagnosize:
        return f"IFD of page {len(tif.pages)} cut"
    (count,) = struct.unpack(header.tagnoformat, raw_count)
    handle.seek(last.offset + header.tagnosize + count * header.tagsize)
    raw_next = handle.read(header.offsetsize)
    if len(raw_next) < header.offsetsize:
        return f"IFD of page {len(tif.pages)} cut"
    (next_offset,) = struct.unpack(header.offsetformat, raw_next)
    if next_offset:
        return f"page {len(tif.pages) + 1} (IFD at byte {next_offset}) is missing or damaged"
    return None


def _corruption(capture: _TiffLogCapture) -> str | None:
    return next((m for m in capture.messages if _CORRUPT.search(m)), None)


def _read_pixels(path: Path, tif: tifffile.TiffFile, capture: _TiffLogCapture, size: int) -> np.ndarray:
    """The first series as a native-endian ZYX array, after structural checks (cheap, before the pixels)."""
    try:
        data_end = 0
        header = tif.tiff
        for page in tif.pages:  # parses every IFD: a cut or damaged one raises or logs here
            tags = page.tags.values()
            ifd_end = page.offset + header.tagnosize + len(tags) * header.tagsize + header.offsetsize
            data_end = max(data_end, ifd_end, *(t.valueoffset + t.valuebytecount for t in tags))
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                if count:
                    data_end = max(data_end, int(offset) + int(count))
        if not tif.series or len(tif.pages) == 0:
            raise CaseError(path, "TIFF file holds no image")
        series = tif.series[0]
        data_end = max(data_end, _series_data_end(series))
        problem = _ifd_chain_problem(tif) or _corruption(capture)
    except CaseError:
        raise
    except Exception as exc:
        raise CaseError(path, f"truncated or corrupt TIFF file ({exc})") from None
    if problem:
        raise CaseError(path, f"truncated or corrupt TIFF file ({problem})")
    shape, axes, dtype = tuple(series.shape), str(series.axes), np.dtype(series.dtype)
    if 0 in shape:
        raise CaseError(path, f"empty image (shape {shape})")
    if data_end > size:
        raise CaseError(
            path, f"truncated TIFF file (its structure needs {data_end} bytes, the file has {size})"
        )
    if tif.pages.first.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
        raise CaseError(path, f"RGB colour image (shape {shape}), expected a grayscale 3-D stack")
    target = _squeeze_to_3d(path, shape, axes)
    _check_dtype(path, dtype)
    try:
        volume = series.asarray()
    except MemoryError:
        raise CaseError(path, f"not enough memory to read {shape} {dtype.name}") from None
    except Exception as exc:
        raise CaseError(path, f"truncated or corrupt TIFF file (cannot read pixel data: {exc})") from None
    problem = _corruption(capture)
    if problem:
        raise CaseError(path, f"truncated or corrupt TIFF file ({problem})")
    if volume.shape != shape:
        raise CaseError(path, f"corrupt TIFF file (read shape {volume.shape}, expected {shape})")
    volume = volume.reshape(target)
    if not volume.dtype.isnative:
        volume = volume.astype(volume.dtype.newbyteorder("="))
    return volume


def read_case(path: Path) -> Case:
    """Read one input stack and its metadata; CaseError for fatal faults, warnings for the rest."""
    path = Path(path)
    size = _check_header(path)
    with _capture_tifffile_log() as capture:
        try:
            with tifffile.TiffFile(path) as tif:
                volume = _read_pixels(path, tif, capture, size)
                try:
                    sources, page = collect_sources(tif)
                except Exception as exc:  # damaged metadata is not fatal: the pixels are fine
                    log.warning(
                        "%s: metadata unreadable, ignored (%s: %s)", path.name, type(exc).__name__, exc
                    )
                    sources, page = [], tif.pages.first
                spacing = resolve_spacing(sources, page)
        except CaseError:
            raise
        except MemoryError:
            raise CaseError(path, "not enough memory to read the file") from None
        except tifffile.TiffFileError as exc:
            raise CaseError(path, f"truncated or corrupt TIFF file ({exc})") from None
        except Exception as exc:  # tifffile raises many kinds on damaged files; none must leak
            raise CaseError(path, f"unreadable TIFF file ({type(exc).__name__}: {exc})") from None
    for message in capture.messages:
        log.debug("%s: tifffile: %s", path.name, message)

    name = path.name
    dtype = volume.dtype
    if dtype.kind == "f":
        log.warning("%s: %s data (expected uint16): intensities used as they are", name, dtype.name)
        bad = zero_non_finite_(volume)
        if bad:
            log.warning("%s: %d NaN/Inf voxel(s) of %d replaced with 0", name, bad, volume.size)
    elif dtype.itemsize == 1:
        log.warning("%s: 8-bit data (%s, expected uint16): low dynamic range", name, dtype.name)
    if _is_constant(volume):
        log.warning(
            "%s: constant image (every voxel = %s): there is nothing to fuse", name, volume.reshape(-1)[0]
        )

    channel, channel_source = resolve_channel(sources, path)
    study, study_source = resolve_study(sources, path)
    for problem in spacing.problems:
        log.debug("%s: spacing: %s", name, problem)
    if spacing.reason:
        log.warning(
            "%s: %s: treated as already isotropic at %g um, no resampling; "
            "the output keeps the input's spacing metadata",
            name,
            spacing.reason,
            TARGET_SPACING_UM,
        )
    elif not spacing.valid:
        detail = "; ".join(spacing.problems) if spacing.problems else "no spacing in the metadata"
        log.warning(
            "%s: missing or invalid voxel spacing (%s): treated as already isotropic at %g um, no resampling",
            name,
            detail,
            TARGET_SPACING_UM,
        )
    for note in spacing.notes:
        log.warning("%s: %s", name, note)
    unit_found = first_unit(sources, ("physicalsizexunit", "unit", "units"))
    meta_sources = {
        "metadata": "+".join(s.name for s in sources) or "none",
        "spacing": _spacing_summary(spacing),
        **spacing.sources,
        "unit": f"{unit_found[1]}={unit_found[0]} (spacing converted to um)" if unit_found else "none (um)",
        "channel": channel_source,
        "study": study_source,
    }
    meta = CaseMetadata(
        spacing=tuple(float(s) for s in spacing.spacing),  # type: ignore[arg-type]
        spacing_valid=spacing.valid,
        channel=channel,
        study=study,
        unit="um",
        raw=raw_metadata(sources),
        sources=meta_sources,
        dtype=dtype.name,
    )
    log.debug(
        "%s: shape %s %s, spacing %s um (%s)",
        name,
        volume.shape,
        dtype.name,
        meta.spacing,
        meta_sources["spacing"],
    )
    return Case(path=path, volume=volume, meta=meta)


def _spacing_summary(result: SpacingResult) -> str:
    if not result.valid:
        return "default"
    origins = []
    for key in ("spacing_x", "spacing_y", "spacing_z"):
        where = result.sources[key]
        origin = "assumed" if where.startswith("assumed") else where.split(":", 1)[0].split(" ", 1)[0]
        if origin not in origins:
            origins.append(origin)
    return "+".join(origins)


def list_cases(folder: Path, include_unreadable: bool = False) -> list[Path]:
    """Input stacks in ``folder``: ``*.tif`` / ``*.tiff`` in any case, regular files, hidden ones skipped.

    Hidden names are skipped because they are never cases: macOS ``._x.tif`` companions and
    our own ``.x.tif.partial-<pid>`` temporaries. ``include_unreadable`` also lists TIFF names
    that are not regular files (a dangling symlink, a folder called ``x.tif``), so that a caller
    who promises one output per input can name them as errors (:func:`read_case` says what they are).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in TIFF_SUFFIXES
        and not p.name.startswith(".")
        and (include_unreadable or p.is_file())
    )


@dataclass(frozen=True)
class IntensityMap:
    """``output = (input - low) * scale``: how a volume outside [0, 65535] was brought into uint16."""

    low: float
    scale: float

    def metadata(self) -> dict[str, Any]:
        return {
            "fmc_intensity_low": self.low,
            "fmc_intensity_scale": self.scale,
            "fmc_intensity_map": "output = (input - fmc_intensity_low) * fmc_intensity_scale",
        }


def fit_uint16_range(case: Case) -> IntensityMap | None:
    """Bring a case whose values do not fit uint16 (negatives, above 65535) into it by an affine map.

    Why a map and not clipping: the output is uint16 (the platform contract), and an int16 volume
    with negative voxels or an int32 one above 65535 would lose everything outside [0, 65535] (an
    int16 input with 46% negatives came out 86% zeros). The challenge's metric normalizes each
    volume by its own percentiles, so an affine map changes no score, while clipping does. A shift
    alone (scale 1) when the range fits 65536 levels, so integer data stays exact; else a scale
    down (float data: always to the full range). The map is logged with the fraction that would
    have been clipped and written into the output's metadata (``fmc_intensity_*``). Returns None
    (nothing changed) for data that fits.
    """
    volume = case.volume
    if volume.dtype == np.uint16 or volume.dtype.kind not in "iuf" or volume.size == 0:
        return None
    low_value = float(min(volume[zs].min() for zs in z_slabs(volume)))
    high_value = float(max(volume[zs].max() for zs in z_slabs(volume)))
    if low_value >= 0 and high_value <= UINT16_MAX:
        return None
    below = sum(int(np.count_nonzero(volume[zs] < 0)) for zs in z_slabs(volume))
    above = sum(int(np.count_nonzero(volume[zs] > UINT16_MAX)) for zs in z_slabs(volume))
    low = min(low_value, 0.0)
    span = high_value - low
    # integers: a shift keeps them exact when they fit; floats carry no integer meaning, and a
    # shift alone would round a small float range to a few levels: they get the full range
    fits = span <= UINT16_MAX and volume.dtype.kind in "iu"
    scale = 1.0 if fits else UINT16_MAX / span if span > 0 else 1.0
    out = np.empty(volume.shape, dtype=np.uint16)
    for zs in z_slabs(volume):
        if scale == 1.0 and volume.dtype.kind in "iu":
            out[zs] = volume[zs].astype(np.int64) - int(low)
        else:
            out[zs] = np.clip(np.rint((volume[zs].astype(np.float64) - low) * scale), 0, UINT16_MAX)
    mapping = IntensityMap(low=low, scale=scale)
    clipped = []
    if below:
        clipped.append(f"{100 * below / volume.size:.1f}% of voxels below 0")
    if above:
        clipped.append(f"{100 * above / volume.size:.1f}% above {UINT16_MAX}")
    how = f"shifted by {-low:+g}" if scale == 1.0 else f"mapped as (value - {low:g}) * {scale:.6g}"
    log.warning(
        "%s: %s data with %s (range %g..%g) would be clipped in the uint16 output: intensities %s "
        "before fusing; the output's metadata records it (fmc_intensity_low=%g, fmc_intensity_scale=%.6g)",
        case.path.name,
        volume.dtype.name,
        " and ".join(clipped),
        low_value,
        high_value,
        how,
        low,
        scale,
    )
    case.volume = out
    case.meta.extra.update(mapping.metadata())
    return mapping
