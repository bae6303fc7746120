"""Step1ModeRule: the one place where a network's output becomes the change, and the change the prediction."""

import pytest
import torch

from fmc.step1_mode import OUTPUT, Step1ModeRule

CORRECTION = Step1ModeRule("correction")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="step1_mode"):
        Step1ModeRule("residual")


def test_output_mode_hands_on_the_output_itself():
    output, start = _rand(4, 5), _rand(4, 5, seed=1)
    assert OUTPUT.change(output, start) is output
    assert OUTPUT.apply(output, start) is output and OUTPUT.apply_(output, start) is output
    assert not OUTPUT.correction and not OUTPUT.zero_head


def test_correction_mode_hands_on_the_change_and_applies_it_at_the_start():
    output, start = _rand(4, 5), _rand(4, 5, seed=1)
    change = CORRECTION.change(output, start)
    assert torch.equal(change, output - start)
    assert torch.equal(CORRECTION.apply(change, start), change + start)
    in_place = change.clone()
    assert CORRECTION.apply_(in_place, start) is in_place and torch.equal(in_place, change + start)
    assert CORRECTION.correction and CORRECTION.zero_head


def test_correction_mode_applied_to_a_zero_change_gives_the_start_to_the_last_bit():
    start = _rand(3, 4, 5)
    assert torch.equal(CORRECTION.apply(CORRECTION.change(start, start), start), start)


def test_apply_keeps_the_graph_for_training():
    output = _rand(2, 3).requires_grad_()
    start = _rand(2, 3, seed=1)
    CORRECTION.apply(CORRECTION.change(output, start), start).sum().backward()
    assert torch.equal(output.grad, torch.ones_like(output))


def test_step_two_blends_only_the_change_to_its_residual_channel_in_correction_mode():
    batch = _rand(2, 2, 4, 4, 4)

    def network(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:2] * 2.0

    assert OUTPUT.patch_change(network, 1) is network
    blended = CORRECTION.patch_change(network, 1)
    assert torch.equal(blended(batch), batch[:, 1:2] * 2.0 - batch[:, 1:2])
    assert torch.equal(CORRECTION.patch_change(network, 0)(batch), batch[:, 1:2] * 2.0 - batch[:, :1])


def test_a_late_patch_makes_no_change_in_correction_mode_and_is_step_one_in_output_mode():
    batch = _rand(2, 2, 4, 4, 4)

    def step_one_channel(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:2]

    assert OUTPUT.patch_stand_in(step_one_channel) is step_one_channel
    stand_in = CORRECTION.patch_stand_in(step_one_channel)(batch)
    assert stand_in.shape == (2, 1, 4, 4, 4) and not stand_in.any()
