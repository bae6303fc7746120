"""The TIFF + metadata contract of the FuseMyCells platform.

Inputs arrive as 3-D ZYX TIFF stacks whose metadata comes in several wild variants
(docs/task.md, Data): tifffile "shaped" JSON, ImageJ descriptions (``spacing`` = z step,
``unit``, X/YResolution tags), plain ``key=value`` lines, OME-XML ``PhysicalSize*``;
PhysicalSize keys spelled ``PhysicalSizeX`` / ``physicalsizex`` / ``physical_size_x``;
units nm, um (micron, µm) or mm. :func:`read_case` folds them into one typed
:class:`CaseMetadata` (spacing always in micrometres) and records where every field came
from; :func:`write_prediction` writes the fused volume back with the input's metadata.

Rules worth knowing (documented here because they are guesses about missing data):

- Priority of sources: shaped JSON > OME-XML > ImageJ > other JSON > ``key=value`` lines >
  resolution tags (X/Y only). The first valid value wins, field by field.
- PhysicalSize values without any unit are micrometres (the OME default).
- Resolution tags: with ResolutionUnit NONE they are pixels per the ImageJ ``unit`` (ImageJ's
  convention); with INCH/CENTIMETER they are converted, unless that gives an implausible size,
  in which case they are read as pixels per the metadata unit (tifffile writes INCH by default
  even when the caller meant pixels per micrometre, as the organizers' writer does).
  ``(1, 1)`` is TIFF's "no resolution" default and carries no information, except in an ImageJ
  file that names a calibrated unit.
- Missing / zero / negative / NaN / implausible X-Y spacing: the case is treated as already
  isotropic at :data:`TARGET_SPACING_UM` (no resampling), ``spacing_valid`` is False, and a
  warning names the file.
- X-Y valid but Z missing: a calibrated ImageJ file gets ImageJ's own default voxel depth of
  1 unit (what Fiji shows for it); any other file gets z = x. Both warn; ``spacing_valid``
  stays True and ``sources["spacing_z"]`` says it was assumed; the assumed z is never written
  to an output.
- X-Y valid but a Z value present and invalid (``PhysicalSizeZ=0``, -2, 1e6 um): not "missing",
  so nothing is guessed: the whole spacing is invalid (isotropic default, no resampling) and
  the warning names the value.
- Y missing but X valid (or the reverse): square pixels are assumed.

Fatal faults raise :class:`CaseError` (file name + one-line reason); recoverable ones log a
warning naming the file and go on. Nothing from tifffile or the OS leaks as a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fmc.atomic import atomic_write
from fmc.memory import z_slabs
from fmc.method import CHANNELS, TARGET_SPACING_UM
from fmc.normalization import UINT16_MAX, clip_to_uint16

log = logging.getLogger(__name__)

METADATA_STYLES = ("shaped", "imagej", "keyvalue", "ome")
KEY_SPELLINGS = ("PhysicalSizeX", "physicalsizex", "physical_size_x")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAUSIBLE_SPACING_UM = (1e-3, 1e3)
"""Voxel sizes outside this range (micrometres) are treated as invalid metadata."""


# --------------------------------------------------------------------------- public types


class CaseError(Exception):
    """A file that cannot be processed; ``str(error)`` is ``"<file name>: <reason>"``."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever tifffile put in it
        super().__init__(f"{self.path.name}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # default pickling would call CaseError(message) and fail in multiprocessing workers
        return (type(self), (self.path, self.reason))


@dataclass
class CaseMetadata:
    """Normalized metadata of one case; ``raw`` is what the file carried, kept for writing back."""

    spacing: tuple[float, float, float]
    spacing_valid: bool
    channel: str
    study: int | None
    unit: str
    raw: dict
    sources: dict[str, str]
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)  # keys fmc adds to the output (intensity map)


@dataclass
class Case:
    """One input file: its ZYX volume (native dtype, finite) and metadata."""

    path: Path
    volume: np.ndarray
    meta: CaseMetadata


# --------------------------------------------------------------------------- units and keys


def _units(names: str, um_per_unit: float) -> dict[str, float]:
    return dict.fromkeys(names.split(), um_per_unit)


_UM_PER_UNIT: dict[str, float] = {
    **_units("nm nanometer nanometers nanometre nanometres", 1e-3),
    **_units("um µm µ u mum micron microns micrometer micrometers micrometre micrometres", 1.0),
    **_units("mm millimeter millimeters millimetre millimetres", 1e3),
    **_units("cm centimeter centimeters centimetre centimetres", 1e4),
    **_units("m meter meters metre metres", 1e6),
    **_units("in inch inches", 25400.0),
}
_UNCALIBRATED = frozenset({"pixel", "pixels", "px", "pix", "voxel", "voxels"})
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> micrometres per unit
_RESUNIT_NAME = {1: "NONE", 2: "INCH", 3: "CENTIMETER", 4: "MILLIMETER", 5: "MICROMETER"}


def _norm_key(key: object) -> str:
    """``PhysicalSizeX`` / ``physicalsizex`` / ``physical_size_x`` -> ``physicalsizex``."""
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def _norm_unit(unit: object) -> str:
    text = str(unit).strip().lower()
    text = text.replace("\\u00b5", "µ").replace("\\u03bc", "µ").replace("μ", "µ")
    return text.strip(" []()")


def _unit_to_um(unit: object) -> float | None:
    """Micrometres per ``unit``; None when uncalibrated (pixel). Raises KeyError when unknown."""
    text = _norm_unit(unit)
    if text in _UNCALIBRATED:
        return None
    return _UM_PER_UNIT[text]


_NUMBER = re.compile(
    r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf(?:inity)?)\s*(.*?)\s*$",
    re.IGNORECASE,
)


def _number(value: object) -> tuple[float | None, str | None]:
    """A float (and an inline unit, ``"0.195 um"``) from a metadata value; (None, None) if not numeric."""
    if isinstance(value, bool) or value is None:
        return None, None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value), None
    if isinstance(value, str):
        match = _NUMBER.match(value)
        if match:
            return float(match[1]), (match[2] or None)
    return None, None


def _plausible(value: float) -> bool:
    low, high = PLAUSIBLE_SPACING_UM
    return math.isfinite(value) and low <= value <= high


# --------------------------------------------------------------------------- metadata sources


@dataclass
class _Source:
    """One place metadata was found: normalized lookup plus the original key/values."""

    name: str
    raw: dict[str, Any]
    default_unit: str | None = None  # e.g. OME: micrometres when no unit attribute
    values: dict[str, Any] = field(init=False)
    keys: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.values, self.keys = {}, {}
        for key, value in self.raw.items():
            norm = _norm_key(key)
            if norm and norm not in self.values:
                self.values[norm] = value
                self.keys[norm] = str(key)

    def get(self, norm: str) -> tuple[Any, str] | None:
        if norm in self.values and self.values[norm] is not None and self.values[norm] != "":
            return self.values[norm], self.keys[norm]
        return None


_IMAGEJ_BOOKKEEPING = frozenset(
    {
        "imagej",
        "images",
        "slices",
        "frames",
        "channels",
        "hyperstack",
        "mode",
        "loop",
        "min",
        "max",
        "ranges",
        "luts",
        "labels",
        "overlays",
        "roi",
        "plot",
    }
)


def _parse_key_values(text: str) -> dict[str, str]:
    """``key=value`` lines (ImageDescription written by hand or by other tools)."""
    out: dict[str, str] = {}
    for line in text.replace("\r", "\n").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key and len(key) <= 64:
            out.setdefault(key, value.strip())
    return out


def _parse_json_description(text: str) -> dict[str, Any] | None:
    """JSON descriptions that tifffile did not recognise as shaped (also single-quoted dicts)."""
    for candidate in (text, text.replace("'", '"')):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_ome(xml: str) -> dict[str, Any]:
    """PhysicalSize* of the first image, its first channel's name, description and map annotations."""
    root = ET.fromstring(xml)
    out: dict[str, Any] = {}
    image = next((e for e in root.iter() if _local(e.tag) == "Image"), None)
    if image is None:
        return out
    pixels = next((e for e in image.iter() if _local(e.tag) == "Pixels"), None)
    if pixels is not None:
        for key, value in pixels.attrib.items():
            if key.startswith("PhysicalSize"):
                out[key] = value
        channel = next((e for e in pixels if _local(e.tag) == "Channel"), None)
        if channel is not None and channel.get("Name"):
            out["channel"] = channel.get("Name")
    description = next((e for e in image if _local(e.tag) == "Description"), None)
    if description is not None and description.text:
        for key, value in _parse_key_values(description.text).items():
            out.setdefault(key, value)
    for element in root.iter():
        if _local(element.tag) == "M" and element.get("K"):
            out.setdefault(element.get("K"), (element.text or "").strip())
    return out


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a metadata value, or ``_DROP`` (arrays, bytes, objects)."""
    if depth > 4:
        return _DROP
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        items = [_jsonable(v, depth + 1) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    if isinstance(value, dict):
        items = {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(value, np.ndarray) and value.size <= 64:
        return _jsonable(value.tolist(), depth + 1)
    return _DROP


_DROP = object()


def _collect_sources(tif: tifffile.TiffFile) -> tuple[list[_Source], tifffile.TiffPage]:
    """Every metadata variant present in the file, highest priority first."""
    page = tif.pages.first
    sources: list[_Source] = []
    shaped = tif.shaped_metadata if tif.is_shaped else None
    if shaped:
        sources.append(_Source("shaped", {k: v for k, v in shaped[0].items() if k != "shape"}))
    if tif.is_ome:
        try:
            sources.append(_Source("ome", _parse_ome(tif.ome_metadata or ""), default_unit="um"))
        except ET.ParseError as exc:
            log.warning("%s: OME-XML unreadable, ignored (%s)", Path(tif.filehandle.path).name, exc)
    imagej = tif.imagej_metadata if tif.is_imagej else None
    if imagej:
        raw = {k: v for k, v in imagej.items() if _norm_key(k) not in _IMAGEJ_BOOKKEEPING}
        sources.append(_Source("imagej", raw))
    description = (page.description or "").strip()
    if not (shaped or imagej or tif.is_ome) and description:
        if description.startswith("{"):
            parsed = _parse_json_description(description)
            if parsed is not None:
                sources.append(_Source("json", {k: v for k, v in parsed.items() if k != "shape"}))
        elif not description.startswith("<"):
            pairs = _parse_key_values(description)
            if pairs:
                sources.append(_Source("keyvalue", pairs))
    return sources, page


def _raw_metadata(sources: list[_Source]) -> dict[str, Any]:
    """Union of all sources' key/values (higher priority wins), JSON-safe, for writing back."""
    raw: dict[str, Any] = {}
    taken: set[str] = set()
    for source in sources:
        for key, value in source.raw.items():
            norm = _norm_key(key)
            if norm in taken:
                continue
            clean = _jsonable(value)
            if clean is not _DROP:
                raw[str(key)] = clean
                taken.add(norm)
    return raw


# --------------------------------------------------------------------------- spacing


@dataclass
class _Axis:
    value_um: float
    where: str


@dataclass
class _SpacingResult:
    spacing: tuple[float, float, float]
    valid: bool
    sources: dict[str, str]
    problems: list[str]
    notes: list[str]
    reason: str = ""  # why the spacing is invalid, when one value says it all


def _first_unit(sources: list[_Source], names: tuple[str, ...]) -> tuple[str, str] | None:
    for source in sources:
        for name in names:
            found = source.get(name)
            if found is not None and isinstance(found[0], str):
                return found[0], f"{source.name}:{found[1]}"
    return None


def _source_unit(source: _Source, axis: str) -> tuple[str | None, str]:
    """Unit of this source's spacing along ``axis``: per-axis keys, then the generic ``unit``."""
    for name in (f"physicalsize{axis}unit", f"{axis}unit", "unit", "units", "spatialunit"):
        found = source.get(name)
        if found is not None:
            return str(found[0]), f"{source.name}:{found[1]}"
    if source.default_unit:
        return source.default_unit, f"{source.name}:default"
    return None, ""


def _to_um(value: float, unit: str | None, problems: list[str], where: str) -> float | None:
    if unit is None:
        return value  # no unit anywhere: micrometres (the OME default)
    try:
        factor = _unit_to_um(unit)
    except KeyError:
        problems.append(f"unknown unit {unit!r} for {where}, assumed micrometres")
        return value
    if factor is None:
        problems.append(f"{where} is in uncalibrated unit {unit!r}")
        return None
    return value * factor


def _axis_candidates(source: _Source, axis: str) -> Iterator[tuple[Any, str]]:
    found = source.get(f"physicalsize{axis}")
    if found is not None:
        yield found
    spacing = source.get("spacing")
    if spacing is not None:
        value, key = spacing
        if isinstance(value, (list, tuple)) and len(value) == 3:
            yield value["zyx".index(axis)], f"{key}[{'zyx'.index(axis)}]"
        elif axis == "z" and not isinstance(value, (list, tuple, dict)):
            yield value, key  # ImageJ: ``spacing`` is the z step


def _find_axis(
    sources: list[_Source], axis: str, problems: list[str], rejected: list[str] | None = None
) -> _Axis | None:
    """The first valid spacing along ``axis``; what was present but unusable goes to ``rejected``."""
    rejected = [] if rejected is None else rejected
    for source in sources:
        for value, key in _axis_candidates(source, axis):
            number, inline_unit = _number(value)
            where = f"{source.name}:{key}"
            if number is None:
                problems.append(f"{where}={value!r} is not a number")
                rejected.append(f"{key}={value!r} is not a number ({source.name} metadata)")
                continue
            shown = str(value).strip()
            unit, unit_where = (inline_unit, where) if inline_unit else _source_unit(source, axis)
            um = _to_um(number, unit, problems, where)
            if um is None:
                rejected.append(f"{key}={shown} is in uncalibrated unit {unit!r} ({source.name} metadata)")
                continue
            if not _plausible(um):
                problems.append(f"{where}={value!r}{' ' + unit if unit else ''} is not a valid spacing")
                in_unit = f", unit {unit}" if unit else ""
                rejected.append(f"{key}={shown} is not a valid spacing ({source.name} metadata{in_unit})")
                continue
            unit_note = f" {unit} [{unit_where}]" if unit else " (no unit: um assumed)"
            return _Axis(um, f"{where}={number:g}{unit_note}")
    return None


def _rational(value: Any) -> float:
    if isinstance(value, tuple) and len(value) == 2:
        return float(value[0]) / float(value[1]) if value[1] else 0.0
    return float(value)


def _resolution_xy(
    page: tifffile.TiffPage, sources: list[_Source], problems: list[str]
) -> tuple[_Axis, _Axis] | None:
    """X/Y spacing from the X/YResolution tags (pixels per unit); see the module docstring."""
    tags = page.tags
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if xres is None or yres is None:
        return None
    try:
        px, py = _rational(xres.value), _rational(yres.value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (px > 0 and py > 0 and math.isfinite(px) and math.isfinite(py)):
        return None
    resunit_tag = tags.get("ResolutionUnit")
    resunit = int(resunit_tag.value) if resunit_tag is not None else 2  # TIFF default: inch
    imagej = next((s for s in sources if s.name == "imagej"), None)
    ij_unit = imagej.get("unit") if imagej is not None else None
    meta_unit = _first_unit(sources, ("unit", "units"))

    def build(um_per_unit: float, note: str) -> tuple[_Axis, _Axis] | None:
        sx, sy = um_per_unit / px, um_per_unit / py
        if _plausible(sx) and _plausible(sy):
            return _Axis(sx, f"resolution {note}"), _Axis(sy, f"resolution {note}")
        return None

    def per_unit(unit: str) -> float | None:
        try:
            return _unit_to_um(unit)
        except KeyError:
            return 1.0

    default = (px, py) == (1.0, 1.0)
    if resunit in _RESUNIT_UM and not default:
        found = build(_RESUNIT_UM[resunit], f"[ResolutionUnit {_RESUNIT_NAME[resunit]}]")
        if found:
            return found
        unit, where = meta_unit if meta_unit else ("um", "assumed")
        factor = per_unit(unit)
        if factor is None:
            return None
        note = f"[pixels per {unit} ({where}); ResolutionUnit {_RESUNIT_NAME[resunit]} ignored]"
        return build(factor, note)
    if ij_unit is not None:
        factor = per_unit(str(ij_unit[0]))
        if factor is None:
            problems.append(f"imagej unit {ij_unit[0]!r} is uncalibrated")
            return None
        return build(factor, f"[pixels per {ij_unit[0]} (imagej:unit)]")
    if default:
        return None
    unit, where = meta_unit if meta_unit else ("um", "assumed")
    factor = per_unit(unit)
    return None if factor is None else build(factor, f"[pixels per {unit} ({where})]")


def _resolve_spacing(sources: list[_Source], page: tifffile.TiffPage) -> _SpacingResult:
    problems: list[str] = []
    notes: list[str] = []
    x = _find_axis(sources, "x", problems)
    y = _find_axis(sources, "y", problems)
    z_rejected: list[str] = []
    z = _find_axis(sources, "z", problems, z_rejected)
    if x is None or y is None:
        xy = _resolution_xy(page, sources, problems)
        if xy is not None:
            x, y = x or xy[0], y or xy[1]
    if x is None and y is not None:
        x = _Axis(y.value_um, f"assumed = y ({y.where})")
        notes.append("no X spacing: square pixels assumed (x = y)")
    if y is None and x is not None:
        y = _Axis(x.value_um, f"assumed = x ({x.where})")
        notes.append("no Y spacing: square pixels assumed (y = x)")
    if x is None or y is None:
        default = (TARGET_SPACING_UM,) * 3
        where = "default (no valid X/Y spacing)"
        return _SpacingResult(
            default, False, dict.fromkeys(("spacing_x", "spacing_y", "spacing_z"), where), problems, notes
        )
    if z is None and z_rejected:
        # A Z value that is there but wrong is not "missing": inventing one would resample the
        # volume by a guess and write the guess back as if it were real (README contract).
        default = (TARGET_SPACING_UM,) * 3
        where = f"default ({z_rejected[0]})"
        return _SpacingResult(
            default,
            False,
            dict.fromkeys(("spacing_x", "spacing_y", "spacing_z"), where),
            [z_rejected[0], *(p for p in problems if p != z_rejected[0])],
            notes,
            reason=z_rejected[0],
        )
    if z is None:
        imagej = next((s for s in sources if s.name == "imagej"), None)
        ij_unit = imagej.get("unit") if imagej is not None else None
        factor = None
        if ij_unit is not None:
            with contextlib.suppress(KeyError):
                factor = _unit_to_um(ij_unit[0])
        if factor is not None and _plausible(factor):
            z = _Axis(factor, f"assumed 1 {ij_unit[0]} (ImageJ default voxel depth)")
            notes.append(f"no Z spacing: ImageJ's default voxel depth of 1 {ij_unit[0]} assumed")
        else:
            z = _Axis(x.value_um, f"assumed = x ({x.where})")
            notes.append(f"no Z spacing: z = x = {x.value_um:g} um assumed")
    spacing = (z.value_um, y.value_um, x.value_um)
    return _SpacingResult(
        spacing, True, {"spacing_z": z.where, "spacing_y": y.where, "spacing_x": x.where}, problems, notes
    )


# --------------------------------------------------------------------------- channel and study


_FILENAME_CHANNEL = re.compile(r"(?:^|[_\-. ])(nucleus|membrane)(?=[_\-. ]|$)")


def _channel_value(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.startswith("nucle"):
        return "nucleus"
    if text.startswith("membr"):
        return "membrane"
    return None


def _resolve_channel(sources: list[_Source], path: Path) -> tuple[str, str]:
    for source in sources:
        for name in ("channel", "channelname"):
            found = source.get(name)
            if found is None:
                continue
            channel = _channel_value(found[0])
            if channel:
                return channel, f"{source.name}:{found[1]}"
            log.debug("%s: %s:%s=%r is not nucleus/membrane", path.name, source.name, found[1], found[0])
    match = _FILENAME_CHANNEL.search(path.name.lower().rsplit(".", 1)[0])
    if match:
        return match[1], "filename"
    return "unknown", "none"


def _study_value(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:study[\s_\-]*)?(\d+)(?:\.0*)?\s*", value, re.IGNORECASE)
        return int(match[1]) if match else None
    return None


def _resolve_study(sources: list[_Source], path: Path) -> tuple[int | None, str]:
    for source in sources:
        for name in ("study", "studyid"):
            found = source.get(name)
            if found is None:
                continue
            study = _study_value(found[0])
            if study is not None:
                return study, f"{source.name}:{found[1]}"
            log.warning(
                "%s: %s:%s=%r is not a study number, ignored", path.name, source.name, found[1], found[0]
            )
    return None, "none"


# --------------------------------------------------------------------------- reading


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


def _check_header(path: Path) -> int:
    """File size; raises CaseError for missing, empty, non-TIFF or cut-off headers."""
    if path.is_symlink() and not path.exists():
        raise CaseError(path, f"broken symbolic link (its target {os.readlink(path)} does not exist)")
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
                    sources, page = _collect_sources(tif)
                except Exception as exc:  # damaged metadata is not fatal: the pixels are fine
                    log.warning(
                        "%s: metadata unreadable, ignored (%s: %s)", path.name, type(exc).__name__, exc
                    )
                    sources, page = [], tif.pages.first
                spacing = _resolve_spacing(sources, page)
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

    channel, channel_source = _resolve_channel(sources, path)
    study, study_source = _resolve_study(sources, path)
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
    unit_found = _first_unit(sources, ("physicalsizexunit", "unit", "units"))
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
        raw=_raw_metadata(sources),
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


def _spacing_summary(result: _SpacingResult) -> str:
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


# --------------------------------------------------------------------------- writing


_SPACING_KEYS = frozenset(
    {
        "physicalsizex",
        "physicalsizey",
        "physicalsizez",
        "physicalsizexunit",
        "physicalsizeyunit",
        "physicalsizezunit",
        "unit",
        "units",
        "spatialunit",
        "xunit",
        "yunit",
        "zunit",
        "spacing",
    }
)
_LAYOUT_KEYS = frozenset({"shape", "axes"})


def output_metadata(meta: CaseMetadata) -> dict[str, Any]:
    """The shaped-JSON metadata written with a prediction: the input's raw keys, normalized fields on top.

    Raw keys that collide (in any spelling) with a normalized field are replaced, so a reader
    never sees two PhysicalSizeX in different units. An invalid spacing is not invented: the raw
    spacing keys go back unchanged and the output reads as invalid again.
    """
    replaced = set(_LAYOUT_KEYS)
    if meta.spacing_valid:
        replaced |= _SPACING_KEYS
    if meta.channel in CHANNELS:
        replaced |= {"channel", "channelname"}
    if meta.study is not None:
        replaced |= {"study", "studyid"}
    out: dict[str, Any] = {}
    for key, value in meta.raw.items():
        clean = _jsonable(value)
        if _norm_key(key) not in replaced and clean is not _DROP:
            out[str(key)] = clean
    out["axes"] = "ZYX"
    if meta.spacing_valid:
        z, y, x = (float(s) for s in meta.spacing)
        out.update(PhysicalSizeX=x, PhysicalSizeY=y, unit="um")
        if not meta.sources.get("spacing_z", "").startswith("assumed"):
            out["PhysicalSizeZ"] = z  # an assumed z stays unwritten: a reader would take it as real
    out.update(meta.extra)
    if meta.channel in CHANNELS:
        out["channel"] = meta.channel
    if meta.study is not None:
        out["study"] = int(meta.study)
    return out


class OutputError(Exception):
    """An output that cannot be written (permissions, a folder in the way, a full disk).

    ``str(error)`` names the output file, never the hidden temporary; no other kernel or
    device fixes it, so inference does not retry it.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"cannot write {self.path}: {self.reason}")


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it; OutputError otherwise.

    Why before fusing: a read-only mount is only noticed at the write otherwise, after minutes
    of work, and the OS error then names the hidden temporary.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(folder, "it exists and is not a folder") from None
    except OSError as error:
        raise OutputError(folder, f"cannot create the folder ({_os_reason(error)})") from None
    probe = folder / f".fmc-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise OutputError(folder, f"the folder is not writable ({_os_reason(error)})") from None


def check_output_target(path: Path) -> None:
    """OutputError when ``path`` cannot take a file: a folder (or other non-file) of that name is there."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        raise OutputError(path, "a folder of that name is in the way")
    if not path.is_file():
        raise OutputError(path, "something that is not a regular file is in the way")


def write_prediction(path: Path, volume: np.ndarray, meta: CaseMetadata) -> None:
    """Write a fused prediction: uint16 BigTIFF, same shape, the input's metadata, resolution = 1/spacing.

    Float input is clipped to [0, 65535] and rounded. The X/Y resolution is written in
    pixels per micrometre with ResolutionUnit MICROMETER, so it agrees with the JSON
    ``unit: um`` whichever one a reader trusts. Atomic (see :func:`atomic_write`).
    """
    path = Path(path)
    data = clip_to_uint16(volume)
    if data.ndim != 3:
        raise ValueError(f"{path.name}: prediction must be 3-D ZYX, got shape {data.shape}")
    options: dict[str, Any] = {
        "bigtiff": True,
        "photometric": "minisblack",
        "metadata": output_metadata(meta),
    }
    if meta.spacing_valid:
        _, y, x = meta.spacing
        options["resolution"] = (1.0 / x, 1.0 / y)
        options["resolutionunit"] = tifffile.RESUNIT.MICROMETER
    check_output_target(path)
    try:
        atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, **options))
    except OSError as error:
        raise OutputError(path, _os_reason(error)) from None


def _spelled_keys(spelling: str) -> tuple[str, str, str]:
    """The (X, Y, Z) PhysicalSize keys in one of :data:`KEY_SPELLINGS`."""
    if spelling not in KEY_SPELLINGS:
        raise ValueError(f"key_spelling must be one of {KEY_SPELLINGS}, got {spelling!r}")
    return (
        spelling,
        spelling.replace("X", "Y").replace("x", "y"),
        spelling.replace("X", "Z").replace("x", "z"),
    )


_OME_UNIT = {"um": "µm", "micron": "µm", "µm": "µm", "nm": "nm", "mm": "mm"}


def write_volume(
    path: Path,
    volume: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    channel: str | None,
    study: int | None,
    style: str = "shaped",
    key_spelling: str = "PhysicalSizeX",
    unit: str = "um",
) -> None:
    """Write a stack with metadata in one wild variant (tests, simulator, sample case).

    ``spacing`` is (z, y, x) in micrometres; ``unit`` picks the unit the file states (values
    are converted into it). Styles, as they occur in the wild:

    - ``shaped``: tifffile JSON with PhysicalSize keys in ``key_spelling``, ``unit``, ``axes``,
      channel, study; resolution 1/x, 1/y under tifffile's default ResolutionUnit (INCH), as the
      organizers' writer does.
    - ``imagej``: ImageJ description with ``spacing`` (z), ``unit``, channel, study and the
      PhysicalSize keys (ImageJ lowercases them); resolution in pixels per unit.
    - ``keyvalue``: plain ``key=value`` lines in ImageDescription; resolution in pixels per cm.
    - ``ome``: OME-XML PhysicalSize*/PhysicalSize*Unit (OME fixes the key spelling), the channel
      as the Channel Name, study and channel in a MapAnnotation.
    """
    if style not in METADATA_STYLES:
        raise ValueError(f"style must be one of {METADATA_STYLES}, got {style!r}")
    kx, ky, kz = _spelled_keys(key_spelling)
    factor = _unit_to_um(unit)
    if factor is None:
        raise ValueError(f"unit {unit!r} is not a length unit")
    z_um, y_um, x_um = (float(s) for s in spacing)
    z, y, x = z_um / factor, y_um / factor, x_um / factor
    data = np.asarray(volume)
    extra: dict[str, Any] = {}
    if channel is not None:
        extra["channel"] = channel
    if study is not None:
        extra["study"] = study
    base: dict[str, Any] = {"photometric": "minisblack"}

    if style == "shaped":
        metadata = {kx: x, ky: y, kz: z, "unit": unit, "axes": "ZYX", **extra}
        options = {**base, "metadata": metadata, "resolution": (1.0 / x, 1.0 / y)}
    elif style == "imagej":
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        ij_unit = unit.encode("ascii", "backslashreplace").decode()  # ImageJ writes µm as \\u00b5m
        metadata = {"spacing": z, "unit": ij_unit, "axes": "ZYX", **extra, kx: x, ky: y, kz: z}
        options = {**base, "imagej": True, "metadata": metadata, "resolution": (1.0 / x, 1.0 / y)}
    elif style == "keyvalue":
        lines = {kx: x, ky: y, kz: z, "unit": unit, "axes": "ZYX", **extra, "shape": list(data.shape)}
        description = "\n".join(f"{k}={v}" for k, v in lines.items())
        options = {
            **base,
            "description": description.encode(),  # UTF-8, as other tools write it
            "metadata": None,
            "resolution": (1e4 / x_um, 1e4 / y_um),
            "resolutionunit": tifffile.RESUNIT.CENTIMETER,
        }
    else:  # ome
        ome_unit = _OME_UNIT.get(_norm_unit(unit), unit)
        metadata = {
            "axes": "ZYX",
            "PhysicalSizeX": x,
            "PhysicalSizeXUnit": ome_unit,
            "PhysicalSizeY": y,
            "PhysicalSizeYUnit": ome_unit,
            "PhysicalSizeZ": z,
            "PhysicalSizeZUnit": ome_unit,
        }
        if channel is not None:
            metadata["Channel"] = {"Name": channel}
        if extra:
            metadata["MapAnnotation"] = {k: str(v) for k, v in extra.items()}
        options = {**base, "ome": True, "metadata": metadata}
    path = Path(path)
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, **options))
