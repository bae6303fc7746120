"""Sliding-window inference: exact reconstruction, no seams, padding of small volumes, batching."""

import itertools
import logging

import pytest
import torch

from fmc.tiling import (
    TensorSource,
    TilingConfig,
    hann_window,
    patch_starts,
    sliding_window_inference,
)

PATCH = (16, 16, 16)


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


def random_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 37, 50, 29),  # odd sizes, several patches per axis
        (1, 16, 16, 16),  # exactly one patch
        (1, 9, 40, 21),  # z shorter than the patch: reflect padding
        (2, 3, 20, 5),  # z and x far shorter than the patch: replicate padding
    ],
)
def test_identity_network_reconstructs_the_input(shape, overlap):
    volume = random_volume(shape)
    out = sliding_window_inference(volume, identity, TilingConfig(patch=PATCH, overlap=overlap, batch=2))
    assert out.shape == volume.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, volume, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_constant_network_has_no_seam(overlap):
    volume = random_volume((1, 37, 50, 29))
    out = sliding_window_inference(
        volume, lambda b: torch.ones_like(b) * 7, TilingConfig(patch=PATCH, overlap=overlap)
    )
    assert (out - 7).abs().max().item() < 7e-6


def test_linear_ramp_stays_linear_across_patch_borders():
    z, y, x = torch.meshgrid(torch.arange(37.0), torch.arange(50.0), torch.arange(29.0), indexing="ij")
    ramp = (0.01 * z + 0.02 * y - 0.03 * x)[None]
    out = sliding_window_inference(ramp, identity, TilingConfig(patch=PATCH, overlap=0.5))
    # A seam would show up as a jump in the first differences at a patch border.
    for axis, slope in ((1, 0.01), (2, 0.02), (3, -0.03)):
        step = out.diff(dim=axis)
        assert (step - slope).abs().max().item() < 1e-5


@pytest.mark.parametrize("overlap", [0.0, 0.125, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("patch", [1, 5, 16])
def test_patch_starts_cover_every_index_and_end_flush(patch, overlap):
    nominal = max(1, int(patch * (1 - overlap)))
    for size in range(1, 70):
        starts = patch_starts(size, patch, overlap)
        assert starts[0] == 0
        if size <= patch:
            assert starts == [0]
            continue
        assert starts[-1] == size - patch
        assert all(0 < b - a <= nominal for a, b in itertools.pairwise(starts))
        covered = set()
        for s in starts:
            covered.update(range(s, s + patch))
        assert covered == set(range(size))


def test_patch_starts_use_the_fewest_patches():
    assert patch_starts(100, 32, 0.0) == [0, 23, 45, 68]
    assert patch_starts(64, 32, 0.5) == [0, 16, 32]
    assert patch_starts(32, 32, 0.5) == [0]


@pytest.mark.parametrize("patch", [(16, 16, 16), (7, 9, 12), (1, 5, 6)])
def test_hann_window_is_floored_symmetric_and_peaks_near_one(patch):
    floor = 1e-3
    window = hann_window(patch, floor)
    assert window.shape == patch and window.dtype == torch.float32
    assert window.min().item() >= floor * (1 - 1e-6)
    assert window.max().item() <= 1.0
    for axis in range(3):
        torch.testing.assert_close(window, window.flip(axis), atol=1e-7, rtol=0)
    assert hann_window(patch, floor) is window  # cached


def test_hann_window_maximum():
    assert hann_window((9, 9, 9), 1e-3).max().item() == pytest.approx(1.0, abs=1e-6)
    assert hann_window((128, 128, 128), 1e-3).max().item() == pytest.approx(1.0, abs=1e-3)
    assert hann_window((16, 16, 16), 1e-3).min().item() == pytest.approx(1e-3, rel=1e-5)


def test_output_channels_come_from_the_predictor():
    volume = random_volume((2, 20, 23, 18))
    out = sliding_window_inference(
        volume, lambda b: b.mean(dim=1, keepdim=True), TilingConfig(patch=PATCH, overlap=0.25)
    )
    assert out.shape == (1, 20, 23, 18)
    torch.testing.assert_close(out[0], volume.mean(dim=0), atol=1e-5, rtol=0)


def test_batch_size_does_not_change_the_result():
    volume = random_volume((1, 30, 27, 33))
    config = dict(patch=PATCH, overlap=0.5)

    def elementwise(b):
        return torch.tanh(3 * b) + b**2

    one = sliding_window_inference(volume, elementwise, TilingConfig(batch=1, **config))
    three = sliding_window_inference(volume, elementwise, TilingConfig(batch=3, **config))
    assert torch.equal(one, three)

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    one = sliding_window_inference(volume, conv, TilingConfig(batch=1, **config))
    three = sliding_window_inference(volume, conv, TilingConfig(batch=3, **config))
    assert one.shape == (2, 30, 27, 33)
    torch.testing.assert_close(one, three, atol=1e-6, rtol=0)


def test_a_real_network_is_blended_without_jumps():
    """A conv net lacks context at patch borders; the floored Hann blend weights those voxels away.

    Includes the volume's edges and corners, where border patches keep weight 1 on their outer
    half (a plain Hann taper there lets neighbouring patch borders take a large share).
    """
    volume = random_volume((1, 40, 40, 40))
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    whole = conv(volume[None])[0].detach()
    tiled = sliding_window_inference(volume, conv, TilingConfig(patch=PATCH, overlap=0.5))
    assert (tiled - whole).abs().max().item() < 1e-2 * whole.abs().max().item()


def test_every_forward_has_the_full_batch_shape():
    shapes = []

    def recording(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        return batch * 3

    volume = random_volume((1, 16, 16, 64))  # 7 patches: batches of 3, 3 and a last one padded to 3
    out = sliding_window_inference(volume, recording, TilingConfig(patch=PATCH, overlap=0.5, batch=3))
    assert shapes == [(3, 1, 16, 16, 16)] * 3
    torch.testing.assert_close(out, volume * 3, atol=1e-5, rtol=0)
    shapes.clear()  # fewer patches than the batch: no padding, one forward of what there is
    sliding_window_inference(random_volume((1, 16, 16, 24)), recording, TilingConfig(patch=PATCH, batch=3))
    assert shapes == [(2, 1, 16, 16, 16)]


def test_progress_is_logged(caplog):
    volume = random_volume((1, 37, 50, 29))
    with caplog.at_level(logging.INFO, logger="fmc.tiling"):
        sliding_window_inference(volume, identity, TilingConfig(patch=PATCH, overlap=0.5))
    messages = [r.getMessage() for r in caplog.records if r.name == "fmc.tiling"]
    assert any("(100%)" in m and "patches/s" in m and "ETA" in m for m in messages)
    assert any("(25%)" in m or "(50%)" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fmc.tiling"):
        sliding_window_inference(volume, identity, TilingConfig(patch=PATCH), progress=False)
    assert not [r for r in caplog.records if r.name == "fmc.tiling" and r.levelno >= logging.INFO]


def test_bad_predictor_output_is_reported():
    volume = random_volume((1, 20, 20, 20))
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(volume, lambda b: b[:, :, :8], TilingConfig(patch=PATCH))


@pytest.mark.parametrize(
    "kwargs",
    [{"overlap": 1.0}, {"overlap": -0.1}, {"batch": 0}, {"patch": (0, 4, 4)}],
)
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        TilingConfig(**kwargs)


def test_volume_must_be_four_dimensional():
    with pytest.raises(ValueError, match="C, Z, Y, X"):
        sliding_window_inference(torch.zeros(10, 10, 10), identity, TilingConfig(patch=PATCH))


@pytest.mark.cuda  # compares the GPU path with the CPU path; skipped without CUDA (conftest)
def test_cuda_matches_cpu():
    volume = random_volume((2, 37, 50, 29))
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 1, 3, padding=1)
    cpu = sliding_window_inference(volume, conv, TilingConfig(patch=PATCH, overlap=0.5))
    gpu = sliding_window_inference(volume.cuda(), conv.cuda(), TilingConfig(patch=PATCH, overlap=0.5))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


class CountingSource(TensorSource):
    """A patch source that records what was asked of it."""

    def __init__(self, volume: torch.Tensor) -> None:
        super().__init__(volume)
        self.requests: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []

    def patch(self, start, size):
        self.requests.append((tuple(start), tuple(size)))
        return super().patch(start, size)


@pytest.mark.parametrize("shape", [(2, 37, 50, 29), (2, 9, 40, 21)])
def test_a_patch_source_gives_the_same_result_as_the_tensor(shape):
    volume = random_volume(shape, seed=4)
    config = TilingConfig(patch=PATCH, overlap=0.5, batch=3)
    network = torch.nn.Conv3d(2, 1, 3, padding=1)
    with torch.no_grad():
        expected = sliding_window_inference(volume, network, config, progress=False)
        source = CountingSource(volume)
        result = sliding_window_inference(source, network, config, progress=False)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)
    if min(shape[1:]) >= PATCH[0]:
        assert source.requests and all(size == PATCH for _, size in source.requests)  # patch by patch
    else:
        assert source.requests == [((0, 0, 0), tuple(shape[1:]))]  # small: read whole, then padded


def test_a_chooser_picks_each_batchs_predictor_before_its_patches_are_gathered():
    volume = random_volume((1, 16, 16, 64))  # 7 patches along x at overlap 0.5, 4 batches of 2
    asked = []

    def choose(predictor, done, count, total):
        asked.append((done, count, total))
        return predictor if done < 6 else (lambda batch: torch.full_like(batch, 3.0))

    config = TilingConfig(patch=PATCH, overlap=0.5, batch=2)
    out = sliding_window_inference(volume, identity, config, choose=choose)
    assert asked == [(0, 2, 7), (2, 2, 7), (4, 2, 7), (6, 1, 7)]
    starts = patch_starts(64, 16, 0.5)
    torch.testing.assert_close(out[..., : starts[-2]], volume[..., : starts[-2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., starts[-1] + 8 :], torch.full_like(out[..., starts[-1] + 8 :], 3.0))
