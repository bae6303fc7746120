"""fmc.io: the TIFF + metadata contract (every wild metadata variant, bad inputs, atomic writes)."""

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fmc.io import (
    KEY_SPELLINGS,
    METADATA_STYLES,
    CaseError,
    CaseMetadata,
    OutputError,
    list_cases,
    read_case,
    write_prediction,
)
from fmc.method import TARGET_SPACING_UM
from fmc.simulated_tiff import write_volume

SHAPE = (8, 16, 16)
SPACING = (1.0, 0.195, 0.39)  # z, y, x: x != y so a swapped axis shows


def _volume(shape=SHAPE, dtype=np.uint16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, size=shape).astype(dtype)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "fmc.io"]


@pytest.fixture(autouse=True)
def _capture_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="fmc.io")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("spelling", KEY_SPELLINGS)
@pytest.mark.parametrize("style", METADATA_STYLES)
def test_every_style_and_spelling_round_trips_through_write_prediction(tmp_path, style, spelling, caplog):
    source = tmp_path / "in" / "image_3_membrane_angle.tif"
    source.parent.mkdir()
    volume = _volume()
    write_volume(
        source, volume, spacing=SPACING, channel="membrane", study=3, style=style, key_spelling=spelling
    )

    case = read_case(source)
    assert case.volume.shape == SHAPE and case.volume.dtype == np.uint16
    np.testing.assert_array_equal(case.volume, volume)
    assert case.meta.spacing == pytest.approx(SPACING)
    assert case.meta.spacing_valid
    assert (case.meta.channel, case.meta.study, case.meta.dtype) == ("membrane", 3, "uint16")
    assert case.meta.sources["channel"] != "filename"  # came from the metadata, not the name
    assert case.meta.sources["metadata"] == case.meta.sources["spacing"] == style
    assert not _warnings(caplog)

    out = tmp_path / "out" / source.name
    out.parent.mkdir()
    write_prediction(out, case.volume.astype(np.float32), case.meta)
    fused = read_case(out)
    assert fused.volume.shape == SHAPE and fused.volume.dtype == np.uint16
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
    tifffile.imwrite(path, _volume(), metadata={**metadata, "objective": "10x", "study": "2"})
    case = read_case(path)
    assert case.meta.spacing == pytest.approx(SPACING)
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


# --------------------------------------------------------------------------- units and spacing sources


@pytest.mark.parametrize(
    ("unit", "scale"), [("nm", 1000.0), ("mm", 0.001), ("micron", 1.0), ("µm", 1.0), ("um", 1.0)]
)
@pytest.mark.parametrize("style", ["shaped", "imagej", "keyvalue", "ome"])
def test_units_are_converted_to_micrometres(tmp_path, style, unit, scale):
    path = tmp_path / "image_1_nucleus_angle.tif"
    write_volume(path, _volume(), spacing=SPACING, channel="nucleus", study=1, style=style, unit=unit)
    case = read_case(path)
    assert case.meta.spacing == pytest.approx(SPACING)
    assert case.meta.unit == "um"
    stated = {k.lower(): v for k, v in case.meta.raw.items()}["physicalsizex"]
    assert float(stated) == pytest.approx(SPACING[2] * scale)  # the file really states it in ``unit``


def test_inline_units_and_per_axis_unit_keys(tmp_path):
    path = tmp_path / "a.tif"
    description = "PhysicalSizeX=0.39 um\nPhysicalSizeY=195\nPhysicalSizeYUnit=nm\nPhysicalSizeZ=0.001 mm"
    tifffile.imwrite(path, _volume(), description=description, metadata=None)
    assert read_case(path).meta.spacing == pytest.approx(SPACING)


def test_imagej_resolution_tags_alone_give_xy_spacing(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        _volume(),
        imagej=True,
        resolution=(1 / 0.39, 1 / 0.195),
        metadata={"spacing": 2.0, "unit": "micron"},
    )
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((2.0, 0.195, 0.39))
    assert meta.sources["spacing_x"].startswith("resolution")
    assert meta.sources["spacing_z"].startswith("imagej:spacing")
    assert not _warnings(caplog)


def test_resolution_in_centimetres_without_other_metadata(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, _volume(), resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER")
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((0.5, 0.25, 0.5))  # z unknown: z = x, with a warning
    assert meta.spacing_valid
    assert any("stack.tif" in w and "Z spacing" in w for w in _warnings(caplog))


def test_organizers_style_inch_resolution_is_read_as_pixels_per_um(tmp_path):
    """tifffile's default ResolutionUnit is INCH even when the values are pixels per micrometre."""
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        _volume(),
        bigtiff=True,
        resolution=(1 / 0.39, 1 / 0.195),
        metadata={"unit": "um", "PhysicalSizeZ": 1.0},
    )
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx(SPACING)
    assert "INCH ignored" in meta.sources["spacing_x"]


def test_imagej_file_without_spacing_gets_imagej_default_depth(tmp_path, caplog):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, _volume(), imagej=True, resolution=(1 / 0.39, 1 / 0.39), metadata={"unit": "micron"}
    )
    meta = read_case(path).meta
    assert meta.spacing == pytest.approx((1.0, 0.39, 0.39))
    assert meta.spacing_valid and meta.sources["spacing_z"].startswith("assumed")
    assert any("stack.tif" in w and "voxel depth" in w for w in _warnings(caplog))


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
    tifffile.imwrite(path, _volume(), **kwargs)
    case = read_case(path)
    assert case.meta.spacing == (TARGET_SPACING_UM,) * 3
    assert not case.meta.spacing_valid
    assert case.meta.sources["spacing"] == "default"
    assert any(name in w and "spacing" in w for w in _warnings(caplog)), _warnings(caplog)

    out = tmp_path / "out" / name  # no spacing is invented on the way out
    out.parent.mkdir()
    write_prediction(out, case.volume, case.meta)
    again = read_case(out).meta
    assert (again.spacing, again.spacing_valid) == (case.meta.spacing, False)


def test_broken_ome_xml_is_ignored_not_fatal(tmp_path, caplog):
    path = tmp_path / "image_2_nucleus_angle.tif"
    description = '<?xml version="1.0"?><OME><Image><Pixels PhysicalSizeX="0.2"></OME>'
    tifffile.imwrite(path, _volume(), description=description, metadata=None)
    case = read_case(path)
    assert case.volume.shape == SHAPE and not case.meta.spacing_valid
    assert case.meta.channel == "nucleus"
    assert any("OME-XML unreadable" in w for w in _warnings(caplog)), _warnings(caplog)


# --------------------------------------------------------------------------- channel and study


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
        path, _volume(), metadata={"PhysicalSizeX": 0.39, "PhysicalSizeY": 0.195, "PhysicalSizeZ": 1}
    )
    meta = read_case(path).meta
    assert meta.channel == channel
    assert meta.sources["channel"] == ("filename" if channel != "unknown" else "none")


def test_metadata_channel_wins_over_the_file_name(tmp_path):
    path = tmp_path / "image_1_nucleus_angle.tif"
    write_volume(path, _volume(), spacing=SPACING, channel="Membrane", study=None)
    meta = read_case(path).meta
    assert (meta.channel, meta.study) == ("membrane", None)
    assert meta.sources["study"] == "none"


@pytest.mark.parametrize(("value", "study"), [("1", 1), (4, 4), ("study_5", 5), (2.0, 2), ("abc", None)])
def test_study_values(tmp_path, value, study):
    path = tmp_path / "image_1_nucleus_angle.tif"
    tifffile.imwrite(path, _volume(), metadata={"PhysicalSizeX": 0.39, "study": value})
    assert read_case(path).meta.study == study


# --------------------------------------------------------------------------- bad inputs


def _not_a_tiff(path: Path) -> None:
    path.write_text("this is a text file, not an image\n" * 4)


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_pixels(path: Path) -> None:
    write_volume(path, _volume((8, 64, 64)), spacing=SPACING, channel="nucleus", study=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _truncated_structure(path: Path) -> None:
    """Pixels intact, the last IFD cut: tifffile alone would still return the data."""
    write_volume(path, _volume(), spacing=SPACING, channel="nucleus", study=1)
    data = path.read_bytes()
    path.write_bytes(data[:-40])


def _flat(path: Path) -> None:
    tifffile.imwrite(path, _volume((16, 16)))


def _four_d(path: Path) -> None:
    tifffile.imwrite(path, _volume((2, 8, 16, 16)), photometric="minisblack", metadata={"axes": "CZYX"})


def _complex(path: Path) -> None:
    tifffile.imwrite(path, _volume().astype(np.complex64), photometric="minisblack")


def _bool(path: Path) -> None:
    tifffile.imwrite(path, _volume() > 2000, photometric="minisblack")


def _zero_size(path: Path) -> None:
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 16, 16), np.uint16))


BAD_INPUTS = {
    "not a TIFF": _not_a_tiff,
    "empty file": _empty_file,
    "truncated or corrupt": _truncated_pixels,
    "truncated": _truncated_structure,
    "2-D": _flat,
    "4-D": _four_d,
    "complex": _complex,
    "bool": _bool,
    "empty image": _zero_size,
}


@pytest.mark.parametrize("keyword", list(BAD_INPUTS))
def test_each_bad_input_raises_case_error_with_its_own_reason(tmp_path, keyword, caplog):
    path = tmp_path / "bad_case.tif"
    BAD_INPUTS[keyword](path)
    with pytest.raises(CaseError) as info:
        read_case(path)
    error = info.value
    assert keyword in error.reason
    assert str(error) == f"bad_case.tif: {error.reason}"
    assert error.path == path and "\n" not in str(error)
    assert not [r for r in caplog.records if r.name == "tifffile"]  # tifffile's own noise is not shown


def test_bad_input_reasons_are_all_different(tmp_path):
    reasons = {}
    for i, make in enumerate(BAD_INPUTS.values()):
        path = tmp_path / f"case_{i}.tif"
        make(path)
        with pytest.raises(CaseError) as info:
            read_case(path)
        reasons[make.__name__] = info.value.reason
    assert len(set(reasons.values())) == len(reasons), reasons
    assert "2-D" not in reasons["_four_d"] and "4-D" not in reasons["_flat"]


@pytest.mark.parametrize("extra", [0, 1, 20])
def test_file_cut_between_ifds_is_truncated_even_with_logging_off(tmp_path, extra):
    """Shaped series need only the first IFD: a file missing its last pages' IFDs must still fail."""
    path = tmp_path / "cut.tif"
    write_volume(path, _volume(), spacing=SPACING, channel="nucleus", study=1)
    with tifffile.TiffFile(path) as tif:
        last_ifd = tif.pages[-1].offset
    path.write_bytes(path.read_bytes()[: last_ifd + extra])
    logging.disable(logging.CRITICAL)  # tifffile's own complaints are logged; detection must not rely on them
    try:
        with pytest.raises(CaseError, match="truncated"):
            read_case(path)
    finally:
        logging.disable(logging.NOTSET)


def test_missing_file_and_folder_are_case_errors(tmp_path):
    with pytest.raises(CaseError, match="not found"):
        read_case(tmp_path / "nope.tif")
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(CaseError, match="folder"):
        read_case(tmp_path / "dir.tif")


@pytest.mark.parametrize(
    ("shape", "axes"), [((1, 8, 16, 16), "CZYX"), ((8, 1, 16, 16), "ZCYX"), ((1, 1, 8, 16, 16), "TCZYX")]
)
def test_singleton_extra_axes_are_squeezed(tmp_path, shape, axes):
    path = tmp_path / "stack.tif"
    volume = _volume(shape)
    tifffile.imwrite(path, volume, photometric="minisblack", metadata={"axes": axes, "PhysicalSizeX": 0.39})
    case = read_case(path)
    assert case.volume.shape == SHAPE
    np.testing.assert_array_equal(case.volume, volume.reshape(SHAPE))


def test_single_plane_stack_is_two_d(tmp_path):
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, _volume((1, 16, 16)), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(CaseError, match="2-D"):
        read_case(path)


def test_case_error_survives_pickling():
    error = pickle.loads(pickle.dumps(CaseError(Path("/x/a.tif"), "2-D image")))
    assert (str(error), error.reason, error.path) == ("a.tif: 2-D image", "2-D image", Path("/x/a.tif"))


# --------------------------------------------------------------------------- recoverable faults


def test_nan_and_inf_voxels_are_counted_and_replaced(tmp_path, caplog):
    volume = _volume().astype(np.float32)
    volume[0, 0, :3] = np.nan
    volume[1, 2, 3] = np.inf
    volume[2, 2, 2] = -np.inf
    path = tmp_path / "holes.tif"
    tifffile.imwrite(path, volume, metadata={"PhysicalSizeX": 0.39, "PhysicalSizeZ": 1.0})
    case = read_case(path)
    assert case.volume.dtype == np.float32 and np.isfinite(case.volume).all()
    assert case.volume[0, 0, :3].tolist() == [0, 0, 0] and case.volume[1, 2, 3] == 0
    expected = volume.copy()
    expected[~np.isfinite(expected)] = 0
    np.testing.assert_array_equal(case.volume, expected)
    warnings = _warnings(caplog)
    assert any("holes.tif" in w and "5 NaN/Inf" in w for w in warnings), warnings
    assert any("holes.tif" in w and "float32" in w for w in warnings), warnings


def test_constant_image_warns_and_is_returned(tmp_path, caplog):
    path = tmp_path / "flat_field.tif"
    tifffile.imwrite(path, np.full(SHAPE, 7, np.uint16), metadata={"PhysicalSizeX": 0.39})
    case = read_case(path)
    assert (case.volume == 7).all()
    assert any("flat_field.tif" in w and "constant" in w for w in _warnings(caplog))


def test_almost_constant_image_does_not_warn(tmp_path, caplog):
    volume = np.full(SHAPE, 7, np.uint16)
    volume[-1, -1, -1] = 8  # the only difference is in the last plane
    path = tmp_path / "nearly_flat.tif"
    tifffile.imwrite(path, volume, metadata={"PhysicalSizeX": 0.39, "PhysicalSizeZ": 1})
    read_case(path)
    assert not any("constant" in w for w in _warnings(caplog))


def test_eight_bit_data_warns(tmp_path, caplog):
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, _volume(dtype=np.uint8), metadata={"PhysicalSizeX": 0.39, "PhysicalSizeZ": 1})
    assert read_case(path).meta.dtype == "uint8"
    assert any("small.tif" in w and "8-bit" in w for w in _warnings(caplog))


def test_big_endian_data_comes_back_native(tmp_path):
    path = tmp_path / "motorola.tif"
    volume = _volume()
    tifffile.imwrite(path, volume, byteorder=">", metadata={"PhysicalSizeX": 0.39})
    case = read_case(path)
    assert case.volume.dtype.isnative
    np.testing.assert_array_equal(case.volume, volume)


# --------------------------------------------------------------------------- writing


def _meta(spacing=SPACING, valid=True) -> CaseMetadata:
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
    volume = np.zeros(SHAPE, np.float32)
    volume[0, 0, :6] = [-5.0, 1.4, 1.6, 70000.0, np.nan, np.inf]
    path = tmp_path / "pred.tif"
    write_prediction(path, volume, _meta())
    out = tifffile.imread(path)
    assert out.dtype == np.uint16 and out.shape == SHAPE
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
        write_prediction(target, _volume(), _meta())
    assert written_to[0].parent == tmp_path and written_to[0].name.startswith(".")
    assert os.listdir(tmp_path) == [target.name]
    assert target.read_bytes() == b"previous output"


def test_write_volume_rejects_unknown_style_and_spelling(tmp_path):
    with pytest.raises(ValueError, match="style"):
        write_volume(tmp_path / "a.tif", _volume(), spacing=SPACING, channel=None, study=None, style="xml")
    with pytest.raises(ValueError, match="key_spelling"):
        write_volume(
            tmp_path / "a.tif", _volume(), spacing=SPACING, channel=None, study=None, key_spelling="px"
        )


def test_list_cases_finds_tiffs_only(tmp_path):
    for name in ("b.tif", "a.TIFF", "c.tiff", "notes.txt", "mip.png", ".a.tif.partial-12", "._b.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.tif").mkdir()
    assert [p.name for p in list_cases(tmp_path)] == ["a.TIFF", "b.tif", "c.tiff"]
    assert list_cases(tmp_path / "missing") == []
