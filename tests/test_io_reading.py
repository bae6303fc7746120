"""fmc.io.reading: each bad input is a CaseError with its own reason; recoverable faults warn; list_cases."""

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import IO_SHAPE, IO_SPACING, fmc_io_warnings, random_volume

from fmc.io import (
    CaseError,
    list_cases,
    read_case,
)
from fmc.simulated_tiff import write_volume

pytestmark = pytest.mark.usefixtures("capture_fmc_io_warnings")


def _not_a_tiff(path: Path) -> None:
    path.write_text("this is a text file, not an image\n" * 4)


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_pixels(path: Path) -> None:
    write_volume(path, random_volume((8, 64, 64)), spacing=IO_SPACING, channel="nucleus", study=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _truncated_structure(path: Path) -> None:
    """Pixels intact, the last IFD cut: tifffile alone would still return the data."""
    write_volume(path, random_volume(), spacing=IO_SPACING, channel="nucleus", study=1)
    data = path.read_bytes()
    path.write_bytes(data[:-40])


def _flat(path: Path) -> None:
    tifffile.imwrite(path, random_volume((16, 16)))


def _four_d(path: Path) -> None:
    tifffile.imwrite(path, random_volume((2, 8, 16, 16)), photometric="minisblack", metadata={"axes": "CZYX"})


def _complex(path: Path) -> None:
    tifffile.imwrite(path, random_volume().astype(np.complex64), photometric="minisblack")


def _bool(path: Path) -> None:
    tifffile.imwrite(path, random_volume() > 2000, photometric="minisblack")


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
    write_volume(path, random_volume(), spacing=IO_SPACING, channel="nucleus", study=1)
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
    volume = random_volume(shape)
    tifffile.imwrite(path, volume, photometric="minisblack", metadata={"axes": axes, "PhysicalSizeX": 0.39})
    case = read_case(path)
    assert case.volume.shape == IO_SHAPE
    np.testing.assert_array_equal(case.volume, volume.reshape(IO_SHAPE))


def test_single_plane_stack_is_two_d(tmp_path):
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, random_volume((1, 16, 16)), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(CaseError, match="2-D"):
        read_case(path)


def test_nan_and_inf_voxels_are_counted_and_replaced(tmp_path, caplog):
    volume = random_volume().astype(np.float32)
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
    warnings = fmc_io_warnings(caplog)
    assert any("holes.tif" in w and "5 NaN/Inf" in w for w in warnings), warnings
    assert any("holes.tif" in w and "float32" in w for w in warnings), warnings


def test_constant_image_warns_and_is_returned(tmp_path, caplog):
    path = tmp_path / "flat_field.tif"
    tifffile.imwrite(path, np.full(IO_SHAPE, 7, np.uint16), metadata={"PhysicalSizeX": 0.39})
    case = read_case(path)
    assert (case.volume == 7).all()
    assert any("flat_field.tif" in w and "constant" in w for w in fmc_io_warnings(caplog))


def test_almost_constant_image_does_not_warn(tmp_path, caplog):
    volume = np.full(IO_SHAPE, 7, np.uint16)
    volume[-1, -1, -1] = 8  # the only difference is in the last plane
    path = tmp_path / "nearly_flat.tif"
    tifffile.imwrite(path, volume, metadata={"PhysicalSizeX": 0.39, "PhysicalSizeZ": 1})
    read_case(path)
    assert not any("constant" in w for w in fmc_io_warnings(caplog))


def test_eight_bit_data_warns(tmp_path, caplog):
    path = tmp_path / "small.tif"
    tifffile.imwrite(
        path, random_volume(dtype=np.uint8), metadata={"PhysicalSizeX": 0.39, "PhysicalSizeZ": 1}
    )
    assert read_case(path).meta.dtype == "uint8"
    assert any("small.tif" in w and "8-bit" in w for w in fmc_io_warnings(caplog))


def test_big_endian_data_comes_back_native(tmp_path):
    path = tmp_path / "motorola.tif"
    volume = random_volume()
    tifffile.imwrite(path, volume, byteorder=">", metadata={"PhysicalSizeX": 0.39})
    case = read_case(path)
    assert case.volume.dtype.isnative
    np.testing.assert_array_equal(case.volume, volume)


def test_list_cases_finds_tiffs_only(tmp_path):
    for name in ("b.tif", "a.TIFF", "c.tiff", "notes.txt", "mip.png", ".a.tif.partial-12", "._b.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.tif").mkdir()
    assert [p.name for p in list_cases(tmp_path)] == ["a.TIFF", "b.tif", "c.tiff"]
    assert list_cases(tmp_path / "missing") == []
