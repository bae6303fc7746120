"""Datasets: global volumes, random crops of [input, step-1 output] with consistent flips, padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmc.training.cache import load_manifest
from fmc.training.data import GlobalDataset, PatchDataset, pad_to, random_flips

from .conftest import GLOBAL_SIZE, PATCH


def test_global_dataset_items(sim_cache: Path) -> None:
    cases = load_manifest(sim_cache).cases
    dataset = GlobalDataset(sim_cache, cases, flips=False)
    x, y = dataset[1]
    assert x.shape == y.shape == (1, GLOBAL_SIZE, GLOBAL_SIZE, GLOBAL_SIZE)
    assert x.dtype == torch.float32
    np.testing.assert_array_equal(
        x[0].numpy(), np.asarray(cases[1].load(sim_cache, "input_global"), np.float32)
    )


def test_patch_dataset_crops_step1_channel_from_the_same_place(sim_cache: Path, tmp_path: Path) -> None:
    cases = load_manifest(sim_cache).cases
    step1 = tmp_path / "step1"
    step1.mkdir()
    for case in cases:  # a fake step-1 output equal to the input: both channels must match voxel for voxel
        np.save(step1 / f"{case.id}.npy", np.asarray(case.load(sim_cache, "input"), dtype=np.float16))
    dataset = PatchDataset(sim_cache, cases, PATCH, patches_per_case=3, step1_dir=step1, flips=True)
    assert len(dataset) == 3 * len(cases)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        x, y = dataset[index]
        assert x.shape == (2, PATCH, PATCH, PATCH) and y.shape == (1, PATCH, PATCH, PATCH)
        torch.testing.assert_close(x[0], x[1])
    single = PatchDataset(sim_cache, cases, PATCH, step1_dir=None)
    assert single[0][0].shape == (1, PATCH, PATCH, PATCH)


def test_patch_dataset_adds_the_cached_distance_crop_last(sim_cache: Path, tmp_path: Path) -> None:
    cases = load_manifest(sim_cache).cases
    step1 = tmp_path / "step1"
    step1.mkdir()
    for case in cases:  # a fake step-1 output equal to the distance: channels 1 and 2 must match
        np.save(step1 / f"{case.id}.npy", np.asarray(case.load(sim_cache, "distance"), dtype=np.float16))
    dataset = PatchDataset(sim_cache, cases, PATCH, step1_dir=step1, flips=True, distance=True)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        x, _ = dataset[index]
        assert x.shape == (3, PATCH, PATCH, PATCH)
        torch.testing.assert_close(x[1], x[2])
    patch_only = PatchDataset(sim_cache, cases, PATCH, step1_dir=None, distance=True)
    assert patch_only[0][0].shape == (2, PATCH, PATCH, PATCH)


def test_crops_find_the_target_under_the_input(sim_cache: Path) -> None:
    """Input and target crops come from the same window: with the target replaced by the input they agree."""
    case = load_manifest(sim_cache).cases[0]
    dataset = PatchDataset(sim_cache, [case], PATCH, flips=True)
    dataset.reader._open[case.array_path(sim_cache, "target")] = case.load(sim_cache, "input")
    for _ in range(5):
        x, y = dataset[0]
        torch.testing.assert_close(x, y)


def test_flips_move_all_tensors_together() -> None:
    a = torch.arange(24.0).reshape(1, 2, 3, 4)
    torch.manual_seed(1)
    seen = set()
    for _ in range(20):
        fa, fb = random_flips(a, a.clone())
        torch.testing.assert_close(fa, fb)
        seen.add(tuple(fa.flatten()[:2].tolist()))
    assert len(seen) > 1


def test_pad_to_mirrors_small_volumes() -> None:
    array = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    padded = pad_to(array, (4, 4, 4))
    assert padded.shape == (4, 4, 4)
    assert set(np.unique(padded)) <= set(range(6))


def test_joint_items_sample_the_global_output_where_the_crop_lies(sim_cache: Path) -> None:
    """With the target replaced by the pipeline's upsampling of the global input, sampling the global
    input at the item's grid must give the target crop exactly: crop, padding and flips all agree."""
    import torch.nn.functional as F

    from fmc.resample import resample_to_shape
    from fmc.training.data import JointDataset

    case = load_manifest(sim_cache).cases[0]
    upsampled = resample_to_shape(
        torch.from_numpy(np.asarray(case.load(sim_cache, "input_global"), dtype=np.float32)), case.iso_shape
    ).numpy()
    big_patch = max(case.iso_shape) + 3  # also exercises the padding of small volumes
    for patch in (PATCH, big_patch):
        dataset = JointDataset(sim_cache, [case], patch, flips=True)
        dataset.reader._open[case.array_path(sim_cache, "target")] = upsampled
        torch.manual_seed(3)
        for _ in range(4):
            x_glob, y_glob, x_patch, y_patch, grid = dataset[0]
            assert x_glob.shape == y_glob.shape == (1, GLOBAL_SIZE, GLOBAL_SIZE, GLOBAL_SIZE)
            assert x_patch.shape == y_patch.shape == (1, patch, patch, patch) and grid.shape == (
                patch,
            ) * 3 + (3,)
            sampled = F.grid_sample(x_glob[None], grid[None], padding_mode="border", align_corners=False)[0]
            torch.testing.assert_close(sampled, y_patch, atol=1e-3, rtol=0)


def test_fit_affine_recovers_a_known_map_and_refuses_a_decreasing_one() -> None:
    from fmc.training.data import fit_affine

    source = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    scale, offset = fit_affine(source, 2.5 * source + 0.3)
    assert abs(scale - 2.5) < 1e-5 and abs(offset - 0.3) < 1e-5
    assert fit_affine(source, -source) == (1.0, 0.0)
    assert fit_affine(np.ones(4), np.arange(4.0)) == (1.0, 0.0)


def test_input_frame_targets_are_the_case_target_mapped_onto_its_input(sim_cache: Path) -> None:
    from fmc.training.data import fit_affine

    case = load_manifest(sim_cache).cases[0]
    plain = PatchDataset(sim_cache, [case], PATCH, flips=False)
    framed = PatchDataset(sim_cache, [case], PATCH, flips=False, target_frame="input")
    scale, offset = fit_affine(
        np.load(case.array_path(sim_cache, "target")), np.load(case.array_path(sim_cache, "input"))
    )
    assert (scale, offset) != (1.0, 0.0)
    torch.manual_seed(3)
    x, y = plain[0]
    torch.manual_seed(3)
    x_framed, y_framed = framed[0]
    assert torch.equal(x, x_framed)  # same crop, same input
    torch.testing.assert_close(y_framed, y * scale + offset, rtol=0, atol=1e-5)
