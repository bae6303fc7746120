"""fmc.io.writing: predictions keep the input's metadata in every style, clipped to uint16, atomically."""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import IO_SHAPE, IO_SPACING, fmc_io_warnings, random_volume

from fmc.io import (
    KEY_SPELLINGS,
    METADATA_STYLES,
    CaseMetadata,
    OutputError,
    read_case,
    write_prediction,
)
from fmc.simulated_tiff import write_volume

pytestmark = pytest.mark.usefixtures("capture_fmc_io_warnings")


@pytest.mark.parametrize("spelling", KEY_SPELLINGS)
@pytest.mark.parametrize("style", METADATA_STYLES)
def test_every_style_and_spelling_round_trips_through_write_prediction(tmp_path, style, spelling, caplog):
    source = tmp_path / "in" / "image_3_membrane_angle.tif"
    source.parent.mkdir()
    volume = random_volume()
    write_volume(
        source, volume, spacing=IO_SPACING, channel="membrane", study=3, style=style, key_spelling=spelling
    )

    case = read_case(source)
    assert case.volume.shape == IO_SHAPE and case.volume.dtype == np.uint16
    np.testing.assert_array_equal(case.volume, volume)
    assert case.meta.spacing == pytest.approx(IO_SPACING)
    assert case.meta.spacing_valid
    assert (case.meta.channel, case.meta.study, case.meta.dtype) == ("membrane", 3, "uint16")
    assert case.meta.sources["channel"] != "filename"  # came from the metadata, not the name
    assert case.meta.sources["metadata"] == case.meta.sources["spacing"] == style
    assert not fmc_io_warnings(caplog)

    out = tmp_path / "out" / source.name
    out.parent.mkdir()
    write_prediction(out, case.volume.astype(np.float32), case.meta)
    fused = read_case(out)
    assert fused.volume.shape == IO_SHAPE and fused.volume.dtype == np.uint16
    np.testing.assert_array_equal(fused.volume, volume)
    assert fused.meta.spacing == pytest.approx(case.meta.spacing)
    assert (fused.meta.channel, fused.meta.study) == ("membrane", 3)
    assert fused.meta.spacing_valid
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        page = tif.pages.first
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(
            1 / 0.39
        )
        assert page.tags["YResolution"].value[0] / page.tags["YResolution"].value[1] == pytest.approx(
            1 / 0.195
        )
    assert os.listdir(out.parent) == [out.name]  # no temporary left behind


def test_output_keeps_extra_raw_keys_and_replaces_other_spellings(tmp_path):
    path = tmp_path / "image_1_nucleus_angle.tif"
    metadata = {"physical_size_x": 390.0, "physical_size_y": 195.0, "physical_size_z": 1000.0, "unit": "nm"}
    tifffile.imwrite(path, random_volume(), metadata={**metadata, "objective": "10x", "study": "2"})
    case = read_case(path)
    assert case.meta.spacing == pytest.approx(IO_SPACING)
    out = tmp_path / "out.tif"
    write_prediction(out, case.volume, case.meta)
    with tifffile.TiffFile(out) as tif:
        written = dict(tif.shaped_metadata[0])
    assert written["objective"] == "10x"
    assert written["unit"] == "um" and written["study"] == 2 and written["channel"] == "nucleus"
    assert (written["PhysicalSizeX"], written["PhysicalSizeY"], written["PhysicalSizeZ"]) == pytest.approx(
        (0.39, 0.195, 1.0)
    )
    assert not any(key.startswith("physical_size") for key in written)  # no second PhysicalSizeX in nm


def _meta(spacing=IO_SPACING, valid=True) -> CaseMetadata:
    return CaseMetadata(
        spacing=spacing,
        spacing_valid=valid,
        channel="nucleus",
        study=2,
        unit="um",
        raw={},
        sources={},
        dtype="uint16",
    )


def test_write_prediction_clips_and_rounds_float(tmp_path):
    volume = np.zeros(IO_SHAPE, np.float32)
    volume[0, 0, :6] = [-5.0, 1.4, 1.6, 70000.0, np.nan, np.inf]
    path = tmp_path / "pred.tif"
    write_prediction(path, volume, _meta())
    out = tifffile.imread(path)
    assert out.dtype == np.uint16 and out.shape == IO_SHAPE
    assert out[0, 0, :6].tolist() == [0, 1, 2, 65535, 0, 65535]


def test_write_prediction_refuses_non_3d(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        write_prediction(tmp_path / "x.tif", np.zeros((4, 4), np.uint16), _meta())
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "image_1_nucleus_angle.tif"
    target.write_bytes(b"previous output")
    written_to = []

    def broken_imwrite(path, *args, **kwargs):
        written_to.append(Path(path))
        Path(path).write_bytes(b"half a TIFF")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OutputError, match=f"cannot write .*{target.name}: disk full"):
        write_prediction(target, random_volume(), _meta())
    assert written_to[0].parent == tmp_path and written_to[0].name.startswith(".")
    assert os.listdir(tmp_path) == [target.name]
    assert target.read_bytes() == b"previous output"
