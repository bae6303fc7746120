"""fmc.pair_files: the one folder layout of the pair writers, with or without every metadata style."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tifffile

from fmc.io import read_case
from fmc.pair_files import write_pairs

SHAPE = (6, 20, 24)


@dataclasses.dataclass(frozen=True)
class _Params:
    spacing: tuple[float, float, float]
    study: int | None
    marker: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pair(i: int) -> tuple[np.ndarray, np.ndarray, _Params]:
    rng = np.random.default_rng(i)
    angle = rng.integers(0, 4000, SHAPE, dtype=np.uint16)
    return angle, angle + np.uint16(7), _Params((2.0, 0.25, 0.25), 2 if i % 2 else None, i)


def _is_imagej(path: Path) -> bool:
    with tifffile.TiffFile(path) as tif:
        return tif.is_imagej


def _is_ome(path: Path) -> bool:
    with tifffile.TiffFile(path) as tif:
        return tif.is_ome


def test_every_style_rotates_the_metadata_and_writes_a_mip_per_pair(tmp_path):
    paths = write_pairs(tmp_path, 4, "nucleus", _pair, {"regime": "harsh", "truth": "x"}, first_id=3)
    kinds = ("angle.tif", "fused.tif", "mip.png", "params.json")
    assert [p.name for p in paths] == [f"image_{3 + i}_nucleus_{kind}" for i in range(4) for kind in kinds]
    # shaped, imagej, keyvalue, ome for the angles; the fused file takes the next style
    assert [_is_imagej(tmp_path / f"image_{3 + i}_nucleus_angle.tif") for i in range(4)] == [0, 1, 0, 0]
    assert _is_ome(tmp_path / "image_6_nucleus_angle.tif") and _is_ome(tmp_path / "image_5_nucleus_fused.tif")
    assert _is_imagej(tmp_path / "image_3_nucleus_fused.tif")
    for i in range(4):
        angle, fused, params = _pair(i)
        for kind, volume in (("angle", angle), ("fused", fused)):
            case = read_case(tmp_path / f"image_{3 + i}_nucleus_{kind}.tif")
            np.testing.assert_array_equal(case.volume, volume)
            np.testing.assert_allclose(case.meta.spacing, params.spacing, rtol=1e-5)
            assert case.meta.channel == "nucleus" and case.meta.study == params.study
        meta = json.loads((tmp_path / f"image_{3 + i}_nucleus_params.json").read_text())
        assert list(meta)[:2] == ["regime", "truth"] and meta["marker"] == i


def test_imagej_only_and_no_mip_as_the_held_out_family_writes(tmp_path):
    header = {"family": "heldout", "regime": "calibrated"}
    paths = write_pairs(tmp_path, 2, "membrane", _pair, header, every_style=False, mip=False)
    kinds = ("angle.tif", "fused.tif", "params.json")
    assert [p.name for p in paths] == [f"image_{i}_membrane_{kind}" for i in range(2) for kind in kinds]
    assert all(_is_imagej(p) for p in paths if p.suffix == ".tif")
    assert not list(tmp_path.glob("*.png"))
    meta = json.loads((tmp_path / "image_1_membrane_params.json").read_text())
    assert meta == {**header, "spacing": [2.0, 0.25, 0.25], "study": 2, "marker": 1}
