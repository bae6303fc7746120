"""Difference weighting: the formula by hand, and the in-place slab form against the reference."""

from __future__ import annotations

import pytest
import torch

from fmc.difference_weighting import (
    difference_weighting,
    difference_weighting_,
    released_difference_weighting_,
)


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


@pytest.mark.parametrize("in_place", [difference_weighting_, released_difference_weighting_])
def test_both_in_place_forms_refuse_volumes_of_two_shapes_or_not_3d(in_place):
    volume = torch.rand(4, 5, 6)
    with pytest.raises(ValueError, match="equal"):
        in_place(volume, torch.rand(4, 5, 7))
    with pytest.raises(ValueError, match="equal"):
        in_place(volume[None], torch.rand(1, 4, 5, 6))


@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(6, 7, 8), (2, 1, 9, 3, 4), (1, 1, 1)])
def test_max_filter_equals_max_pooling(size, shape):
    from fmc.difference_weighting import max_filter3d

    volume = torch.rand(shape, generator=torch.Generator().manual_seed(size))
    batched = volume.reshape(-1, 1, *shape[-3:])
    expected = torch.nn.functional.max_pool3d(batched, size, 1, size // 2).reshape(shape)
    assert torch.equal(max_filter3d(volume, size), expected)


def test_training_with_a_max_filter_gets_gradients_through_difference_weighting():
    """--dw-train-max-filter: the filter runs under autograd and passes gradients to the output."""
    from fmc.difference_weighting import difference_weighting, max_filter3d

    inp = torch.rand(1, 1, 6, 7, 8, generator=torch.Generator().manual_seed(0))
    initial = torch.rand(1, 1, 6, 7, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.equal(max_filter3d(initial, 3), max_filter3d(initial.detach(), 3))
    difference_weighting(inp, initial, max_filter=3).sum().backward()
    assert initial.grad is not None and initial.grad.abs().sum() > 0


def _corner_case() -> tuple[torch.Tensor, torch.Tensor]:
    """I = 0, O = 0.1 everywhere but 1.0 at the corner voxel of a 3^3 cube."""
    inp = torch.zeros(3, 3, 3)
    out = torch.full((3, 3, 3), 0.1)
    out[0, 0, 0] = 1.0
    return inp, out


def test_released_form_matches_hand_computation():
    from fmc.difference_weighting import ReleasedForm, released_difference_weighting_

    inp, out = _corner_case()
    # D = |I - O| = 0.1, 1.0 at the corner; max filter 3 -> 1.0 on the corner's 2^3 block, 0.1 elsewhere;
    # no smoothing (sigma 0), grid = the cube (no resampling); p2 = 0.1, p98 = 1.0 -> D = 1 on the
    # block, 0 elsewhere; I (1 - D) + O D keeps O (not max-filtered) on the block, I elsewhere.
    expected = torch.zeros(3, 3, 3)
    expected[:2, :2, :2] = 0.1
    expected[0, 0, 0] = 1.0
    result = released_difference_weighting_(inp, out.clone(), ReleasedForm(grid=3, max_filter=3, sigma=0.0))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_paper_form_on_the_same_case_blends_the_max_filtered_output():
    inp, out = _corner_case()
    # D = |I - maxfilter(O)| = 1.0 on the block, 0.1 elsewhere -> min-max [1, 0]; the blend takes
    # the max-filtered output (1.0) on the whole block: the two forms differ on 7 voxels.
    expected = torch.zeros(3, 3, 3)
    expected[:2, :2, :2] = 1.0
    torch.testing.assert_close(
        difference_weighting_(inp, out.clone(), max_filter=3), expected, rtol=0, atol=1e-6
    )


def test_released_weight_map_is_smooth_coarse_and_clipped():
    from fmc.difference_weighting import (
        ReleasedForm,
        gaussian_blur3d,
        released_difference_weighting_,
        released_weight_map,
    )

    generator = torch.Generator().manual_seed(0)
    inp = torch.rand(20, 30, 25, generator=generator)
    out = inp.clone()
    out[5:8, 10:14, 10:12] += 3.0  # one region changed by the network
    weight = released_weight_map(inp, out, ReleasedForm(grid=16, max_filter=3, sigma=1.0))
    assert weight.shape == (16, 16, 16) and float(weight.min()) == 0.0 and float(weight.max()) == 1.0
    result = released_difference_weighting_(inp, out.clone(), ReleasedForm(grid=16, max_filter=3, sigma=1.0))
    assert torch.allclose(result[0], inp[0], atol=1e-5)  # far from the change: the input
    assert float(result[6, 12, 11] - inp[6, 12, 11]) > 2.0  # at the change: mostly the output
    # the Gaussian keeps the sum away from the edges and leaves a constant volume as it is
    torch.testing.assert_close(gaussian_blur3d(torch.ones(5, 6, 7), 1.5), torch.ones(5, 6, 7))
