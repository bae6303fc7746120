"""fmc.io.metadata: every metadata style, key spelling and unit; resolution tags; broken OME-XML."""

import pytest
import tifffile
from conftest import IO_SHAPE, IO_SPACING, fmc_io_warnings, random_volume

from fmc.io import (
    read_case,
)
from fmc.simulated_tiff import write_volume

pytestmark = pytest.mark.usefixtures("capture_fmc_io_warnings")


@pytest.mark.parametrize(
    ("unit", "scale"), [("nm", 1000.0), ("mm", 0.001), ("micron", 1.0), ("µm", 1.0), ("um", 1.0)]
)
@pytest.mark.parametrize("style", ["shaped", "imagej", "keyvalue", "ome"])
def test_units_are_converted_to_micrometres(tmp_path, style, unit, scale):
    path = tmp_path / "image_1_nucleus_angle.tif"
    write_volume(
        path, random_volume(), spacing=IO_SPACING, channel="nucleus", study=1, style=style, unit=unit
    )
    case = read_case(path)
    assert case.meta.spacing == pytest.approx(IO_SPACING)
    assert case.meta.unit == "um"
    stated = {k.lower(): v for k, v in case.meta.raw.items()}["physicalsizex"]
    assert float(stated) == pytest.approx(IO_SPACING[2] * scale)  # the file really states it in ``unit``


def test_inline_units_and_per_axis_unit_keys(tmp_path):
    path = tmp_path / "a.tif"
    description = "PhysicalSizeX=0.39 um\nPhysicalSizeY=195\nPhysicalSizeYUnit=nm\nPhysicalSizeZ=0.001 mm"
    tifffile.imwrite(path, random_volume(), description=description, metadata=None)
    assert read_case(path).meta.spacing == pytest.approx(IO_SPACING)


def _write_with_xy_resolution(path, **tags) -> None:
    """A random volume whose resolution tags say 0.39 um (x) and 0.195 um (y) per pixel, plus ``tags``."""
    tifffile.imwrite(path, random_volume(), resolution=(1 / 0.39, 1 / 0.195), **tags)


def test_imagej_resolution_tags_alone_give_xy_spacing(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    _write_with_xy_resolution(path, imagej=True, metadata={"spacing": 2.0, "unit": "micron"})
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((2.0, 0.195, 0.39))
    assert meta.sources["spacing_x"].startswith("resolution")
    assert meta.sources["spacing_z"].startswith("imagej:spacing")
    assert not fmc_io_warnings(caplog)


def test_resolution_in_centimetres_without_other_metadata(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, random_volume(), resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER")
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((0.5, 0.25, 0.5))  # z unknown: z = x, with a warning
    assert meta.spacing_valid
    assert any("stack.tif" in w and "Z spacing" in w for w in fmc_io_warnings(caplog))


def test_organizers_style_inch_resolution_is_read_as_pixels_per_um(tmp_path):
    """tifffile's default ResolutionUnit is INCH even when the values are pixels per micrometre."""
    path = tmp_path / "stack.tif"
    _write_with_xy_resolution(path, bigtiff=True, metadata={"unit": "um", "PhysicalSizeZ": 1.0})
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx(IO_SPACING)
    assert "INCH ignored" in meta.sources["spacing_x"]


def test_broken_ome_xml_is_ignored_not_fatal(tmp_path, caplog):
    path = tmp_path / "image_2_nucleus_angle.tif"
    description = '<?xml version="1.0"?><OME><Image><Pixels PhysicalSizeX="0.2"></OME>'
    tifffile.imwrite(path, random_volume(), description=description, metadata=None)
    case = read_case(path)
    assert case.volume.shape == IO_SHAPE and not case.meta.spacing_valid
    assert case.meta.channel == "nucleus"
    assert any("OME-XML unreadable" in w for w in fmc_io_warnings(caplog)), fmc_io_warnings(caplog)
