"""RUNet / Discriminator3D: shapes for odd sizes, global residual, preset sizes, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from fmc.network import PRESETS, Discriminator3D, RUNet, RUNetConfig, count_parameters, preset


@pytest.mark.parametrize("in_channels", [1, 2])
def test_odd_size_output_matches_input(in_channels: int) -> None:
    torch.manual_seed(0)
    net = RUNet(preset("tiny", in_channels=in_channels)).eval()
    x = torch.randn(2, in_channels, 17, 23, 30)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 1, 17, 23, 30)
    assert torch.isfinite(y).all()


def test_size_smaller_than_the_padding_multiple() -> None:
    net = RUNet(preset("tiny")).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 1, 5, 3)).shape == (1, 1, 1, 5, 3)


def test_global_residual_adds_the_first_input_channel() -> None:
    torch.manual_seed(0)
    net = RUNet(preset("tiny", in_channels=2)).eval()
    x = torch.randn(1, 2, 9, 10, 11)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        assert torch.equal(net(x), x[:, :1])
        config = RUNetConfig.from_dict({**net.config.to_dict(), "residual": False})
        plain = RUNet(config).eval()
        plain.load_state_dict(net.state_dict())
        assert torch.count_nonzero(plain(x)) == 0


def test_residual_from_the_step1_channel_starts_as_that_channel_and_still_learns() -> None:
    torch.manual_seed(0)
    config = RUNetConfig.from_dict({**preset("tiny", in_channels=2).to_dict(), "residual_channel": 1})
    net = RUNet(config)
    x = torch.randn(2, 2, 9, 10, 11)
    assert torch.equal(net.eval()(x), x[:, 1:2])  # untrained: exactly the step-1 prediction
    net.train()
    loss = (net(x) - x[:, :1]).abs().mean()
    loss.backward()
    assert net.head.weight.grad.abs().sum() > 0  # the zero head is not stuck
    with pytest.raises(ValueError, match="from channel 1 needs in_channels >= 2"):
        RUNetConfig(in_channels=1, residual_channel=1)


def test_gradients_reach_the_first_layer() -> None:
    net = RUNet(preset("tiny"))
    net(torch.randn(2, 1, 12, 12, 12)).square().mean().backward()
    first = net.encoders[0][0][0].conv1.weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_wrong_channel_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expects \(B, 2"):
        RUNet(preset("tiny", in_channels=2))(torch.randn(1, 1, 8, 8, 8))


def _count(config: RUNetConfig) -> int:
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter
        return count_parameters(RUNet(config))


def test_paper_preset_has_about_54m_parameters() -> None:
    for in_channels in (1, 2):
        assert 50_000_000 <= _count(preset("paper", in_channels)) <= 58_000_000
    assert PRESETS["paper"].channels == (32, 64, 128, 256, 256)
    assert PRESETS["paper"].blocks == (1, 1, 2, 2, 2)


def test_small_preset_stays_small() -> None:
    # default weights for both steps must stay far below 20 MB (float32: 4 bytes a parameter)
    assert 200_000 <= _count(preset("small", 2)) <= 2_500_000
    assert _count(preset("tiny")) < 50_000


def test_config_round_trips_through_json() -> None:
    config = preset("small", in_channels=3)
    back = RUNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert isinstance(back.channels, tuple) and isinstance(back.blocks, tuple)
    assert back.in_channels == 3


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown RUNetConfig keys"):
        RUNetConfig.from_dict({**RUNetConfig().to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="same length"):
        RUNetConfig(channels=(4, 8), blocks=(1,))
    with pytest.raises(ValueError, match="unknown RUNet preset"):
        preset("huge")


def test_group_norm_groups_are_clamped_to_divisors() -> None:
    config = RUNetConfig(channels=(6, 12), blocks=(1, 1), groups=8)
    net = RUNet(config)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert {m.num_groups for m in norms} == {2, 4}


def test_discriminator_gives_patch_logits() -> None:
    disc = Discriminator3D(in_channels=2, base=4, levels=3)
    out = disc(torch.randn(2, 2, 32, 24, 16))
    assert out.shape == (2, 1, 4, 3, 2)
    with pytest.raises(ValueError, match="needs every spatial size"):
        disc(torch.randn(1, 2, 4, 32, 32))
