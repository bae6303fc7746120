"""Losses and difference weighting, eq. (2), on tensors small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmc.training.losses import (
    LossWeights,
    cosine_loss,
    discriminator_loss,
    generator_adversarial_loss,
    pearson_loss,
    reconstruction_loss,
    ssim3d_loss,
)
from fmc.training.module import apply_difference_weighting


def test_difference_weighting_matches_the_hand_computation() -> None:
    # I = [.2 .4 .6 .8], O' = [.3 .2 .6 1.4]  ->  |I - O'| = [.1 .2 0 .6], min-max normalized = [1/6 1/3 0 1]
    # O = (1 - D) I + D O' = [5/6*.2 + 1/6*.3, 2/3*.4 + 1/3*.2, .6, 1.4] = [.21667, .33333, .6, 1.4]
    inp = torch.tensor([0.2, 0.4, 0.6, 0.8]).reshape(1, 1, 1, 2, 2)
    initial = torch.tensor([0.3, 0.2, 0.6, 1.4]).reshape(1, 1, 1, 2, 2)
    out = apply_difference_weighting(inp, initial)
    expected = torch.tensor([0.2 * 5 / 6 + 0.3 / 6, 0.4 * 2 / 3 + 0.2 / 3, 0.6, 1.4]).reshape(1, 1, 1, 2, 2)
    torch.testing.assert_close(out, expected)


def test_difference_weighting_normalizes_each_sample_on_its_own() -> None:
    # Sample 2 is sample 1 with every difference doubled: normalized weights are the same per sample,
    # so O - I doubles too. A batch-wide normalization would halve sample 1's weights instead.
    inp = torch.zeros(2, 1, 1, 1, 3)
    initial = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 2.0]]).reshape(2, 1, 1, 1, 3)
    out = apply_difference_weighting(inp, initial)
    # D = [0, .5, 1] for both; O = D * O'
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(out[1].flatten(), torch.tensor([0.0, 0.5, 2.0]))


def test_difference_weighting_keeps_the_input_where_nothing_changed() -> None:
    inp = torch.rand(1, 1, 4, 4, 4)
    torch.testing.assert_close(apply_difference_weighting(inp, inp.clone()), inp)


def test_ssim_loss_is_the_reported_metric() -> None:
    from fmc.metrics import ssim3d

    rng = np.random.default_rng(0)
    a = rng.random((16, 18, 20), dtype=np.float32)
    b = (0.7 * a + 0.3 * rng.random((16, 18, 20), dtype=np.float32)).astype(np.float32)
    loss = ssim3d_loss(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert abs((1 - float(loss)) - ssim3d(a, b)) < 1e-4
    assert float(ssim3d_loss(torch.from_numpy(a)[None, None], torch.from_numpy(a)[None, None])) < 1e-6


def test_pearson_and_cosine_ignore_what_they_should() -> None:
    x = torch.rand(2, 1, 4, 5, 6) + 0.1
    assert float(pearson_loss(x, 3 * x + 2)) < 1e-5  # offset and scale
    assert float(cosine_loss(x, 4 * x)) < 1e-5  # scale only
    assert float(pearson_loss(x, -x)) == pytest.approx(2.0, abs=1e-5)


def test_reconstruction_loss_sums_the_enabled_terms() -> None:
    x, y = torch.rand(2, 1, 12, 12, 12), torch.rand(2, 1, 12, 12, 12)
    total, parts = reconstruction_loss(x, y, LossWeights(alpha=2.0))
    assert set(parts) == {"mae"}
    torch.testing.assert_close(total, 2 * (x - y).abs().mean())
    total, parts = reconstruction_loss(x, y, LossWeights(alpha=1.0, ssim=0.5, pearson=0.25, cosine=0.125))
    expected = parts["mae"] + 0.5 * parts["ssim"] + 0.25 * parts["pearson"] + 0.125 * parts["cosine"]
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("mode", ["bce", "lsgan"])
def test_adversarial_losses_point_the_right_way(mode: str) -> None:
    confident_real, confident_fake = torch.full((2, 1, 2, 2, 2), 5.0), torch.full((2, 1, 2, 2, 2), -5.0)
    if mode == "lsgan":
        confident_real, confident_fake = torch.ones(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2)
    good_d = discriminator_loss(confident_real, confident_fake, mode)
    bad_d = discriminator_loss(confident_fake, confident_real, mode)
    assert float(good_d) < 0.01 < float(bad_d)
    assert float(generator_adversarial_loss(confident_real, mode)) < float(
        generator_adversarial_loss(confident_fake, mode)
    )
