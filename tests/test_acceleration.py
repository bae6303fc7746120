"""Kernel options: every option gives the float32 eager result (to its precision) and falls back on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from fmc.acceleration import KernelOptions, build_forward, effective_options
from fmc.network import RUNet, preset


def _network(seed: int = 0) -> RUNet:
    torch.manual_seed(seed)
    return RUNet(preset("tiny", in_channels=2))


def _batch() -> torch.Tensor:
    return torch.rand(2, 2, 16, 24, 20, generator=torch.Generator().manual_seed(1))


def _reference() -> torch.Tensor:
    with torch.inference_mode():
        return _network().eval()(_batch())


@pytest.mark.parametrize(
    "kwargs", [{"precision": "fp64"}, {"compile": "fastest"}, {"precision": "bf16", "compile": "turbo"}]
)
def test_unknown_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        KernelOptions(**kwargs)


def test_cpu_falls_back_to_float32_for_fp16_and_turns_cudnn_off(caplog):
    wanted = KernelOptions(precision="fp16-weights", channels_last=True, cudnn_benchmark=True)
    with caplog.at_level(logging.WARNING):
        got = effective_options(wanted, torch.device("cpu"))
    assert got == KernelOptions(precision="fp32", channels_last=True, cudnn_benchmark=False)
    assert "needs CUDA" in caplog.text
    assert effective_options(wanted, torch.device("cuda")) == wanted  # nothing changes where CUDA runs


def test_auto_precision_is_float16_weights_on_cuda_and_float32_elsewhere(caplog):
    with caplog.at_level(logging.WARNING):
        assert effective_options(KernelOptions(), torch.device("cpu")).precision == "fp32"
    assert "needs CUDA" not in caplog.text  # the default is no reason for a warning
    assert effective_options(KernelOptions(), torch.device("cuda")).precision == "fp16-weights"
    assert effective_options(KernelOptions(precision="fp32"), torch.device("cuda")).precision == "fp32"


def test_unset_channels_last_is_on_for_cpu_and_off_for_cuda():
    assert effective_options(KernelOptions(), torch.device("cpu")).channels_last is True
    assert effective_options(KernelOptions(), torch.device("cuda")).channels_last is False
    assert effective_options(KernelOptions(channels_last=False), torch.device("cpu")).channels_last is False


@pytest.mark.parametrize(
    ("options", "tolerance"),
    [
        (KernelOptions(channels_last=False), 0.0),
        (KernelOptions(), 1e-5),  # CPU default: channels_last
        (KernelOptions(channels_last=True), 1e-5),
        (KernelOptions(precision="bf16"), 0.1),  # bf16 keeps 8 bits of mantissa
        (KernelOptions(precision="fp16-weights", channels_last=False), 0.0),  # CPU: float32
    ],
)
def test_forward_matches_eager_float32(options, tolerance):
    forward = build_forward(_network(), options, torch.device("cpu"))
    with torch.inference_mode():
        out = forward(_batch())
    assert out.dtype == torch.float32 and out.is_contiguous()
    reference = _reference()
    assert out.shape == reference.shape
    assert (out - reference).abs().max().item() <= tolerance
    if options.precision == "bf16":
        assert not torch.equal(out, reference)  # autocast really ran


def test_compile_wraps_the_network_once_and_logs_each_new_shape(monkeypatch, caplog):
    modes = []
    original = torch.compile

    def eager_backend_compile(model, **kwargs):  # no C++ toolchain needed: dynamo with the eager backend
        modes.append(kwargs.get("mode"))
        return original(model, backend="eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    torch._dynamo.reset()
    forward = build_forward(_network(), KernelOptions(compile="default"), torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="fmc.acceleration"), torch.inference_mode():
        first = forward(_batch())
        forward(_batch())
        forward(_batch()[:1])
    assert modes == ["default"]
    assert caplog.text.count("torch.compile(default) for input") == 2  # (2, ...) and (1, ...)
    torch.testing.assert_close(first, _reference(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp16-weights", "fp16"])
def test_the_cuda_fp16_code_paths_run_and_stay_close_to_float32(monkeypatch, precision):
    """The CPU normally falls back to float32; forcing the CUDA branch here runs the real half
    precision path (weights cast, input cast, float32 out) that a GPU would take."""
    import fmc.acceleration as acceleration

    monkeypatch.setattr(acceleration, "effective_options", lambda options, device: options)
    forward = build_forward(
        _network(), KernelOptions(precision=precision, channels_last=False), torch.device("cpu")
    )
    with torch.inference_mode():
        out = forward(_batch())
    assert out.dtype == torch.float32
    difference = (out - _reference()).abs().max().item()
    assert 0 < difference < 0.02  # really computed in half precision, and still close
