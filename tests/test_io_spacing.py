"""fmc.io.spacing: missing or invalid spacing, the assumed depth, channel and study resolution."""

import pytest
import tifffile
from conftest import IO_SPACING, fmc_io_warnings, random_volume

from fmc.io import (
    read_case,
    write_prediction,
)
from fmc.method import TARGET_SPACING_UM
from fmc.simulated_tiff import write_volume

pytestmark = pytest.mark.usefixtures("capture_fmc_io_warnings")


def test_imagej_file_without_spacing_gets_imagej_default_depth(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, random_volume(), imagej=True, resolution=(1 / 0.39, 1 / 0.39), metadata={"unit": "micron"}
    )
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((1.0, 0.39, 0.39))
    assert meta.spacing_valid and meta.sources["spacing_z"].startswith("assumed")
    assert any("stack.tif" in w and "voxel depth" in w for w in fmc_io_warnings(caplog))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("no_metadata.tif", {"metadata": None}),
        ("zero.tif", {"metadata": {"PhysicalSizeX": 0, "PhysicalSizeY": 0, "PhysicalSizeZ": 1.0}}),
        ("negative.tif", {"metadata": {"physicalsizex": -0.2, "physicalsizey": -0.2, "physicalsizez": 1.0}}),
        ("nan.tif", {"metadata": {"physical_size_x": float("nan"), "physical_size_y": "nan"}}),
        (
            "pixels.tif",
            {"imagej": True, "resolution": (2.0, 2.0), "metadata": {"unit": "pixel", "spacing": 1.0}},
        ),
    ],
)
def test_missing_or_invalid_spacing_falls_back_to_isotropic_default(tmp_path, caplog, name, kwargs):
    path = tmp_path / name
    tifffile.imwrite(path, random_volume(), **kwargs)
    case = read_case(path)
    assert case.meta.spacing == (TARGET_SPACING_UM,) * 3
    assert not case.meta.spacing_valid
    assert case.meta.sources["spacing"] == "default"
    assert any(name in w and "spacing" in w for w in fmc_io_warnings(caplog)), fmc_io_warnings(caplog)

    out = tmp_path / "out" / name  # no spacing is invented on the way out
    out.parent.mkdir()
    write_prediction(out, case.volume, case.meta)
    again = read_case(out).meta
    assert (again.spacing, again.spacing_valid) == (case.meta.spacing, False)


@pytest.mark.parametrize(
    ("name", "channel"),
    [
        ("image_12_nucleus_angle.tif", "nucleus"),
        ("image_12_membrane.tif", "membrane"),
        ("image_12_membrane.TIFF", "membrane"),
        ("membrane_image_3.tif", "membrane"),
        ("image_12_nucleusx.tif", "unknown"),
        ("image_12.tif", "unknown"),
    ],
)
def test_channel_falls_back_to_the_file_name(tmp_path, name, channel):
    path = tmp_path / name
    tifffile.imwrite(
        path, random_volume(), metadata={"PhysicalSizeX": 0.39, "PhysicalSizeY": 0.195, "PhysicalSizeZ": 1}
    )
    meta = read_case(path).meta
    assert meta.channel == channel
    assert meta.sources["channel"] == ("filename" if channel != "unknown" else "none")


def test_metadata_channel_wins_over_the_file_name(tmp_path):
    path = tmp_path / "image_1_nucleus_angle.tif"
    write_volume(path, random_volume(), spacing=IO_SPACING, channel="Membrane", study=None)
    meta = read_case(path).meta
    assert (meta.channel, meta.study) == ("membrane", None)
    assert meta.sources["study"] == "none"


@pytest.mark.parametrize(("value", "study"), [("1", 1), (4, 4), ("study_5", 5), (2.0, 2), ("abc", None)])
def test_study_values(tmp_path, value, study):
    path = tmp_path / "image_1_nucleus_angle.tif"
    tifffile.imwrite(path, random_volume(), metadata={"PhysicalSizeX": 0.39, "study": value})
    assert read_case(path).meta.study == study


def test_a_refused_study_value_is_named_and_the_next_key_is_read(tmp_path, caplog):
    path = tmp_path / "image_1_nucleus_angle.tif"
    tifffile.imwrite(path, random_volume(), metadata={"PhysicalSizeX": 0.39, "study": "abc", "StudyID": 3})
    meta = read_case(path).meta
    assert meta.study == 3 and meta.sources["study"].endswith(":StudyID")
    where = meta.sources["study"].removesuffix("StudyID")
    assert any(f"{where}study='abc' is not a study number" in w for w in fmc_io_warnings(caplog))
