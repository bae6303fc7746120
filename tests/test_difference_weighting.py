"""Difference weighting: the formula by hand, and the in-place slab form against the reference."""

from __future__ import annotations

import pytest
import torch

from fmc.difference_weighting import difference_weighting, difference_weighting_


def test_difference_weighting_matches_hand_computation():
    inp = torch.tensor([0.0, 0.5, 1.0, 0.2])
    initial = torch.tensor([0.0, 0.7, 0.0, 0.2])
    # |I - O'| = [0, .2, 1, 0] is already in [0, 1] with min 0, max 1: weights are the same.
    expected = torch.tensor([0.0, 0.8 * 0.5 + 0.2 * 0.7, 0.0 * 1.0 + 1.0 * 0.0, 0.2])
    assert torch.allclose(difference_weighting(inp, initial), expected)


def test_difference_weighting_normalizes_the_difference():
    inp = torch.tensor([1.0, 1.0, 1.0])
    initial = torch.tensor([1.5, 2.0, 3.0])  # |I - O'| = [.5, 1, 2] -> [0, 1/3, 1]
    expected = torch.tensor([1.0, (2 / 3) * 1.0 + (1 / 3) * 2.0, 3.0])
    assert torch.allclose(difference_weighting(inp, initial), expected)


def test_max_filter_is_applied_to_the_initial_output_first():
    inp = torch.zeros(1, 5, 5, 5)
    initial = torch.zeros(1, 5, 5, 5)
    initial[0, 2, 2, 2] = 1.0
    out = difference_weighting(inp, initial, max_filter=3)
    assert out[0, 1:4, 1:4, 1:4].eq(1.0).all()  # dilated peak survives where the difference is maximal
    assert out[0, 0].eq(0).all()


@pytest.mark.parametrize("max_filter", [0, 3, 5])
@pytest.mark.parametrize("slab_voxels", [1, 7 * 9 * 11, 10**9])
def test_in_place_slabs_equal_the_reference(max_filter, slab_voxels):
    generator = torch.Generator().manual_seed(max_filter)
    inp = torch.rand(23, 9, 11, generator=generator)
    initial = torch.rand(23, 9, 11, generator=generator)
    expected = difference_weighting(inp, initial, max_filter)
    result = difference_weighting_(inp, initial, max_filter, slab_voxels=slab_voxels)
    assert result.data_ptr() == initial.data_ptr()  # written in place, no full-size copy returned
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_in_place_refuses_aliasing_and_even_filters():
    volume = torch.rand(4, 5, 6)
    with pytest.raises(ValueError, match="share memory"):
        difference_weighting_(volume, volume)
    with pytest.raises(ValueError, match="odd"):
        difference_weighting_(volume, volume.clone(), max_filter=4)
    with pytest.raises(ValueError, match="equal"):
        difference_weighting_(volume, torch.rand(4, 5, 7))


@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(6, 7, 8), (2, 1, 9, 3, 4), (1, 1, 1)])
def test_max_filter_equals_max_pooling(size, shape):
    from fmc.difference_weighting import max_filter3d

    volume = torch.rand(shape, generator=torch.Generator().manual_seed(size))
    batched = volume.reshape(-1, 1, *shape[-3:])
    expected = torch.nn.functional.max_pool3d(batched, size, 1, size // 2).reshape(shape)
    assert torch.equal(max_filter3d(volume, size), expected)
