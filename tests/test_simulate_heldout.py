"""The held-out forward-model family: seeded, shaped as asked, its physics visible in the pairs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fmc.io import read_case
from fmc.simulate_heldout import draw_params, heldout_pair, main, simulate_heldout_pair

SHAPE = (32, 48, 48)


def test_same_seed_same_bytes_and_pair_indices_are_independent():
    a = heldout_pair(5, 1, "nucleus", SHAPE)
    b = heldout_pair(5, 1, "nucleus", SHAPE)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    other = heldout_pair(5, 2, "nucleus", SHAPE)
    assert not np.array_equal(a[1], other[1])
    angle, fused, params = a
    assert angle.dtype == fused.dtype == np.uint16 and angle.shape == fused.shape == params.shape
    assert params.shape[1:] == SHAPE[1:] and 16 <= params.shape[0] <= SHAPE[0]


@pytest.mark.parametrize("channel", ["nucleus", "membrane"])
def test_the_single_view_is_dimmer_than_the_fusion_and_bleaches_in_acquisition_order(channel):
    params = dataclasses.replace(
        draw_params(np.random.default_rng(1), channel, SHAPE, "harsh"),
        photons=2e4,
        read_noise=0.0,
        background=0.0,
    )
    angle, fused = simulate_heldout_pair(dataclasses.replace(params, bleach=0.0), 3)
    bleached, _ = simulate_heldout_pair(dataclasses.replace(params, bleach=0.6), 3)
    assert np.percentile(fused, 99.8) > np.percentile(angle, 99.8) - params.offset  # the view is dimmer
    # same seed, same specimen and camera: bleaching alone scales each plane's signal down, by
    # 0 for the plane acquired first and by 0.6 for the last one
    a, b = angle.astype(np.float64) - params.offset, bleached.astype(np.float64) - params.offset
    lit = a > 200
    kept = np.array([b[z][lit[z]].sum() / a[z][lit[z]].sum() for z in range(len(a)) if lit[z].sum() > 20])
    if params.detection_from_end:
        kept = kept[::-1]
    assert kept[0] > 0.85 and kept[-1] < 0.6 and np.all(np.diff(kept) < 0.05)


def test_the_specimen_differs_between_channels():
    nucleus = heldout_pair(9, 0, "nucleus", SHAPE)[1].astype(np.float64)
    membrane = heldout_pair(9, 0, "membrane", SHAPE)[1].astype(np.float64)
    assert np.corrcoef(nucleus.ravel(), membrane.ravel())[0, 1] < 0.8


def test_cli_writes_readable_pairs_with_offset_ids(tmp_path, capsys):
    argv = ["--n", "1", "--channel", "membrane", "--seed", "2", "--first-id", "1000"]
    assert main(["--out", str(tmp_path), *argv, "--shape", *map(str, SHAPE)]) == 0
    case = read_case(tmp_path / "image_1000_membrane_angle.tif")
    assert case.meta.channel == "membrane" and case.volume.shape[1:] == SHAPE[1:]
    assert (tmp_path / "image_1000_membrane_fused.tif").is_file()
    assert (tmp_path / "image_1000_membrane_params.json").is_file()


@pytest.mark.parametrize(("channel", "low", "high"), [("nucleus", 0.62, 0.9), ("membrane", 0.6, 0.85)])
def test_a_fresh_calibrated_held_out_draw_is_as_close_to_its_truth_as_the_real_data(channel, low, high):
    """docs/simulation.md, "Regimes": SSIM(input, fused) centred near 0.78 / 0.70; harsh far below."""
    from fmc.metrics import ssim3d
    from fmc.normalization import percentile_normalize

    def input_ssim(regime: str, index: int) -> float:
        angle, fused, _ = heldout_pair(4343, index, channel, (40, 112, 112), regime)
        return ssim3d(percentile_normalize(angle), percentile_normalize(fused), device="scipy")

    calibrated = [input_ssim("calibrated", i) for i in range(4)]
    assert low <= float(np.mean(calibrated)) <= high, calibrated
    assert float(np.mean([input_ssim("harsh", i) for i in range(2)])) < 0.5
