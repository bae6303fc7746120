"""FusionModule: training uses the pipeline's step-1 arithmetic (fmc.step1_mode)."""

import pytest
import torch
import torch.nn.functional as F

from fmc.step1_mode import Step1ModeRule
from fmc.training.config import FitConfig, MethodConfig
from fmc.training.module import FusionModule, apply_difference_weighting, network_config


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


@pytest.mark.parametrize(
    ("form", "stage", "in_loss"), [("paper", 2, True), ("released", 2, False), ("paper", 1, False)]
)
def test_forward_weights_the_final_stage_by_difference_with_the_training_max_filter(form, stage, in_loss):
    config = {
        **FitConfig().to_dict(),
        "preset": "tiny",
        "dw": True,
        "dw_form": form,
        "dw_train_max_filter": 3,
    }
    torch.manual_seed(0)
    step1 = network_config(MethodConfig(preset="tiny"), 1).to_dict()
    module = FusionModule(config, stage, step1 if stage == 2 else None)
    assert module.apply_dw == (stage == 2) and module.dw_in_loss == in_loss
    channels = module.generator.config.in_channels
    x = torch.rand((1, channels, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = module.generator(x).float()
        weighted = apply_difference_weighting(x[:, :1], raw, 3)
        assert torch.equal(module(x), weighted if in_loss else raw)
