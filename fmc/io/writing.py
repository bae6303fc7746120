"""Writing predictions: the output's metadata (the input's own keys), the checks made before
minutes of fusing, and the atomic BigTIFF write the platform expects.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fmc.atomic import atomic_write
from fmc.io.case import CaseMetadata
from fmc.io.metadata import DROP, jsonable, norm_key
from fmc.method import CHANNELS
from fmc.normalization import clip_to_uint16

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
        clean = jsonable(value)
        if norm_key(key) not in replaced and clean is not DROP:
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
