"""fmc.device: one device rule for every command."""

import pytest
import torch

from fmc import device


def test_a_cuda_that_cannot_start_falls_back_to_the_cpu(monkeypatch, caplog):
    def no_kernel_image(device=None):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "get_device_name", no_kernel_image)
    assert device.select_device("auto") == torch.device("cpu")
    assert "CUDA is present but unusable (CUDA error: no kernel image" in caplog.text


def test_cpu_is_taken_when_asked_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    assert device.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    assert device.select_device("cuda") == torch.device("cpu")  # falls back, with a warning
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        device.select_device("gpu")
