"""Metadata sources of a platform TIFF and the unit / key rules (see :mod:`fmc.io` for the rules).

Every place metadata hides in a TIFF (shaped JSON, ImageJ, ``key=value`` lines, OME-XML, other
JSON) becomes one :class:`Source`, in priority order; keys and units are normalized here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fmc.io.case import PLAUSIBLE_SPACING_UM

log = logging.getLogger("fmc.io")  # one logger for the whole package


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
RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> micrometres per unit
RESUNIT_NAME = {1: "NONE", 2: "INCH", 3: "CENTIMETER", 4: "MILLIMETER", 5: "MICROMETER"}


def norm_key(key: object) -> str:
    """``PhysicalSizeX`` / ``physicalsizex`` / ``physical_size_x`` -> ``physicalsizex``."""
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def norm_unit(unit: object) -> str:
    text = str(unit).strip().lower()
    text = text.replace("\\u00b5", "µ").replace("\\u03bc", "µ").replace("μ", "µ")
    return text.strip(" []()")


def unit_to_um(unit: object) -> float | None:
    """Micrometres per ``unit``; None when uncalibrated (pixel). Raises KeyError when unknown."""
    text = norm_unit(unit)
    if text in _UNCALIBRATED:
        return None
    return _UM_PER_UNIT[text]


_NUMBER = re.compile(
    r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf(?:inity)?)\s*(.*?)\s*$",
    re.IGNORECASE,
)


def parse_number(value: object) -> tuple[float | None, str | None]:
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


def plausible(value: float) -> bool:
    low, high = PLAUSIBLE_SPACING_UM
    return math.isfinite(value) and low <= value <= high


# --------------------------------------------------------------------------- metadata sources


@dataclass
class Source:
    """One place metadata was found: normalized lookup plus the original key/values."""

    name: str
    raw: dict[str, Any]
    default_unit: str | None = None  # e.g. OME: micrometres when no unit attribute
    values: dict[str, Any] = field(init=False)
    keys: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.values, self.keys = {}, {}
        for key, value in self.raw.items():
            norm = norm_key(key)
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


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of a metadata value, or ``DROP`` (arrays, bytes, objects)."""
    if depth > 4:
        return DROP
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        items = [jsonable(v, depth + 1) for v in value]
        return DROP if any(v is DROP for v in items) else items
    if isinstance(value, dict):
        items = {str(k): jsonable(v, depth + 1) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not DROP}
    if isinstance(value, np.ndarray) and value.size <= 64:
        return jsonable(value.tolist(), depth + 1)
    return DROP


DROP = object()


def collect_sources(tif: tifffile.TiffFile) -> tuple[list[Source], tifffile.TiffPage]:
    """Every metadata variant present in the file, highest priority first."""
    page = tif.pages.first
    sources: list[Source] = []
    shaped = tif.shaped_metadata if tif.is_shaped else None
    if shaped:
        sources.append(Source("shaped", {k: v for k, v in shaped[0].items() if k != "shape"}))
    if tif.is_ome:
        try:
            sources.append(Source("ome", _parse_ome(tif.ome_metadata or ""), default_unit="um"))
        except ET.ParseError as exc:
            log.warning("%s: OME-XML unreadable, ignored (%s)", Path(tif.filehandle.path).name, exc)
    imagej = tif.imagej_metadata if tif.is_imagej else None
    if imagej:
        raw = {k: v for k, v in imagej.items() if norm_key(k) not in _IMAGEJ_BOOKKEEPING}
        sources.append(Source("imagej", raw))
    description = (page.description or "").strip()
    if not (shaped or imagej or tif.is_ome) and description:
        if description.startswith("{"):
            parsed = _parse_json_description(description)
            if parsed is not None:
                sources.append(Source("json", {k: v for k, v in parsed.items() if k != "shape"}))
        elif not description.startswith("<"):
            pairs = _parse_key_values(description)
            if pairs:
                sources.append(Source("keyvalue", pairs))
    return sources, page


def raw_metadata(sources: list[Source]) -> dict[str, Any]:
    """Union of all sources' key/values (higher priority wins), JSON-safe, for writing back."""
    raw: dict[str, Any] = {}
    taken: set[str] = set()
    for source in sources:
        for key, value in source.raw.items():
            norm = norm_key(key)
            if norm in taken:
                continue
            clean = jsonable(value)
            if clean is not DROP:
                raw[str(key)] = clean
                taken.add(norm)
    return raw
