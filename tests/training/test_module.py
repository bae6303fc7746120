"""FusionModule: training uses the pipeline's step-1 arithmetic (fmc.step1_mode)."""

import pytest
import torch
import torch.nn.functional as F

from fmc.step1_mode import Step1ModeRule
from fmc.training.config import FitConfig, MethodConfig
from fmc.training.module import FusionModule, network_config


@pytest.mark.parametrize("mode", ["output", "correction"])
def test_step_one_starts_with_a_zero_head_exactly_when_its_mode_says_so(mode):
    config = network_config(MethodConfig(step1_mode=mode, preset="tiny"), 1)
    assert config.zero_head == Step1ModeRule(mode).zero_head


@pytest.mark.parametrize("mode", ["output", "correction"])
def test_joint_training_guides_step_two_with_the_pipelines_step_one_channel(mode):
    config = {**FitConfig().to_dict(), "step": "joint", "step1_mode": mode, "preset": "tiny"}
    torch.manual_seed(0)
    step1 = network_config(MethodConfig(step1_mode=mode, preset="tiny"), 1).to_dict()
    module = FusionModule(config, 2, step1)
    with torch.no_grad():  # a non-zero head: the change is not zero
        for parameter in module.step1_net.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    g = torch.Generator().manual_seed(1)
    x_glob, y_glob = torch.rand((1, 1, 16, 16, 16), generator=g), torch.rand((1, 1, 16, 16, 16), generator=g)
    x_patch, y_patch = torch.rand((1, 1, 8, 8, 8), generator=g), torch.rand((1, 1, 8, 8, 8), generator=g)
    grid = torch.rand((1, 8, 8, 8, 3), generator=g) * 2 - 1
    with torch.no_grad():
        x, y, _, _ = module._joint_inputs((x_glob, y_glob, x_patch, y_patch, grid))
        step1 = Step1ModeRule(mode)
        change = step1.change(module.step1_net(x_glob).float(), x_glob)
        sampled = F.grid_sample(change, grid, mode="bilinear", padding_mode="border", align_corners=False)
        expected = step1.apply(sampled, x_patch)
    assert torch.equal(x[:, :1], x_patch) and torch.equal(y, y_patch)
    assert torch.equal(x[:, 1:], expected)
