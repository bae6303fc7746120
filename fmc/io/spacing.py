"""Spacing (always micrometres), channel and study from the metadata sources, field by field.

The rules for missing and invalid values are listed in :mod:`fmc.io`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fmc.io.metadata import RESUNIT_NAME, RESUNIT_UM, Source, parse_number, plausible, unit_to_um
from fmc.method import TARGET_SPACING_UM

log = logging.getLogger("fmc.io")  # one logger for the whole package


@dataclass
class _Axis:
    value_um: float
    where: str


@dataclass
class SpacingResult:
    spacing: tuple[float, float, float]
    valid: bool
    sources: dict[str, str]
    problems: list[str]
    notes: list[str]
    reason: str = ""  # why the spacing is invalid, when one value says it all


def found_values(sources: list[Source], names: tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    """Each value stored under one of ``names``, source by source, with where it is (``source:key``)."""
    for source in sources:
        for name in names:
            found = source.get(name)
            if found is not None:
                yield found[0], f"{source.name}:{found[1]}"


def first_unit(sources: list[Source], names: tuple[str, ...]) -> tuple[str, str] | None:
    for value, where in found_values(sources, names):
        if isinstance(value, str):
            return value, where
    return None


def _source_unit(source: Source, axis: str) -> tuple[str | None, str]:
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
        factor = unit_to_um(unit)
    except KeyError:
        problems.append(f"unknown unit {unit!r} for {where}, assumed micrometres")
        return value
    if factor is None:
        problems.append(f"{where} is in uncalibrated unit {unit!r}")
        return None
    return value * factor


def _axis_candidates(source: Source, axis: str) -> Iterator[tuple[Any, str]]:
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
    sources: list[Source], axis: str, problems: list[str], rejected: list[str] | None = None
) -> _Axis | None:
    """The first valid spacing along ``axis``; what was present but unusable goes to ``rejected``."""
    rejected = [] if rejected is None else rejected
    for source in sources:
        for value, key in _axis_candidates(source, axis):
            number, inline_unit = parse_number(value)
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
            if not plausible(um):
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
    page: tifffile.TiffPage, sources: list[Source], problems: list[str]
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
    meta_unit = first_unit(sources, ("unit", "units"))

    def build(um_per_unit: float, note: str) -> tuple[_Axis, _Axis] | None:
        sx, sy = um_per_unit / px, um_per_unit / py
        if plausible(sx) and plausible(sy):
            return _Axis(sx, f"resolution {note}"), _Axis(sy, f"resolution {note}")
        return None

    def per_unit(unit: str) -> float | None:
        try:
            return unit_to_um(unit)
        except KeyError:
            return 1.0

    default = (px, py) == (1.0, 1.0)
    if resunit in RESUNIT_UM and not default:
        found = build(RESUNIT_UM[resunit], f"[ResolutionUnit {RESUNIT_NAME[resunit]}]")
        if found:
            return found
        unit, where = meta_unit if meta_unit else ("um", "assumed")
        factor = per_unit(unit)
        if factor is None:
            return None
        note = f"[pixels per {unit} ({where}); ResolutionUnit {RESUNIT_NAME[resunit]} ignored]"
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


def resolve_spacing(sources: list[Source], page: tifffile.TiffPage) -> SpacingResult:
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
        return SpacingResult(
            default, False, dict.fromkeys(("spacing_x", "spacing_y", "spacing_z"), where), problems, notes
        )
    if z is None and z_rejected:
        # A Z value that is there but wrong is not "missing": inventing one would resample the
        # volume by a guess and write the guess back as if it were real (docs/inference.md, "The
        # error contract").
        default = (TARGET_SPACING_UM,) * 3
        where = f"default ({z_rejected[0]})"
        return SpacingResult(
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
                factor = unit_to_um(ij_unit[0])
        if factor is not None and plausible(factor):
            z = _Axis(factor, f"assumed 1 {ij_unit[0]} (ImageJ default voxel depth)")
            notes.append(f"no Z spacing: ImageJ's default voxel depth of 1 {ij_unit[0]} assumed")
        else:
            z = _Axis(x.value_um, f"assumed = x ({x.where})")
            notes.append(f"no Z spacing: z = x = {x.value_um:g} um assumed")
    spacing = (z.value_um, y.value_um, x.value_um)
    return SpacingResult(
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


def resolve_channel(sources: list[Source], path: Path) -> tuple[str, str]:
    for value, where in found_values(sources, ("channel", "channelname")):
        channel = _channel_value(value)
        if channel:
            return channel, where
        log.debug("%s: %s=%r is not nucleus/membrane", path.name, where, value)
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


def resolve_study(sources: list[Source], path: Path) -> tuple[int | None, str]:
    for value, where in found_values(sources, ("study", "studyid")):
        study = _study_value(value)
        if study is not None:
            return study, where
        log.warning("%s: %s=%r is not a study number, ignored", path.name, where, value)
    return None, "none"
