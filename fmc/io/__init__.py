"""The TIFF + metadata contract of the platform: :func:`read_case` in, :func:`write_prediction` out.

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

Modules, by job: :mod:`fmc.io.case` (the typed result and the error), :mod:`fmc.io.metadata`
(metadata sources, unit and key rules), :mod:`fmc.io.spacing` (spacing, channel and study
resolution), :mod:`fmc.io.reading` (reading with its integrity checks), :mod:`fmc.io.writing`
(writing predictions). Test files in every metadata style are written by :mod:`fmc.simulated_tiff`.
"""

from fmc.io.case import KEY_SPELLINGS, METADATA_STYLES, TIFF_SUFFIXES, Case, CaseError, CaseMetadata
from fmc.io.reading import IntensityMap, fit_uint16_range, list_cases, read_case
from fmc.io.writing import (
    OutputError,
    check_output_target,
    check_writable_folder,
    output_metadata,
    write_prediction,
)

__all__ = [
    "KEY_SPELLINGS",
    "METADATA_STYLES",
    "TIFF_SUFFIXES",
    "Case",
    "CaseError",
    "CaseMetadata",
    "IntensityMap",
    "OutputError",
    "check_output_target",
    "check_writable_folder",
    "fit_uint16_range",
    "list_cases",
    "output_metadata",
    "read_case",
    "write_prediction",
]
