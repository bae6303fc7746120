"""The input's way to the device: 16-bit bits kept, exact percentiles, bands in float32 on use."""

import numpy as np
import pytest
import torch

from fmc.host_to_device import DeviceVolume, upload
from fmc.normalization import percentile_bounds
from fmc.resample import resample_to_shape

CPU = torch.device("cpu")


def _uint16(shape=(9, 12, 10), seed=0) -> np.ndarray:
    """Values across the whole uint16 range, including the upper half (int16 would read them negative)."""
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


def test_uint16_planes_come_back_as_the_exact_values():
    volume = _uint16()
    uploaded = upload(volume, CPU)
    assert uploaded.unsigned16 and uploaded.data.dtype == torch.int16 and uploaded.shape == volume.shape
    planes = uploaded.planes(2, 7)
    assert planes.dtype == torch.float32
    assert np.array_equal(planes.numpy(), volume[2:7].astype(np.float32))


def test_a_contiguous_uint16_array_is_shared_on_the_cpu_and_left_unchanged():
    volume = _uint16()
    before = volume.copy()
    uploaded = upload(volume, CPU)
    assert uploaded.data.data_ptr() == volume.ctypes.data  # no second copy of the input
    resample_to_shape(uploaded, (5, 6, 7))
    assert np.array_equal(volume, before)
    strided = _uint16((9, 12, 20))[:, :, ::2]  # not contiguous: copied slab by slab
    copied = upload(strided, CPU)
    assert copied.data.data_ptr() != strided.ctypes.data
    assert np.array_equal(copied.planes(0, 9).numpy(), strided.astype(np.float32))


def test_other_dtypes_are_held_as_float32():
    volume = np.random.default_rng(1).random((6, 8, 7)).astype(np.float64)
    uploaded = upload(volume, CPU)
    assert not uploaded.unsigned16 and uploaded.data.dtype == torch.float32
    np.testing.assert_allclose(uploaded.planes(0, 6).numpy(), volume, rtol=1e-7)


def test_uint16_percentiles_are_exact():
    volume = _uint16((40, 50, 60), seed=2)
    got = upload(volume, CPU).percentile_bounds(2.0, 99.8)
    assert got == pytest.approx(tuple(np.percentile(volume, [2.0, 99.8])), abs=1e-9)
    assert got == pytest.approx(percentile_bounds(volume), abs=1e-9)


def test_resampling_the_bits_equals_resampling_the_float_volume():
    volume = _uint16((17, 30, 26), seed=3)
    reference = resample_to_shape(torch.from_numpy(volume.astype(np.float32)), (28, 10, 9))
    got = resample_to_shape(upload(volume, CPU), (28, 10, 9))
    torch.testing.assert_close(got, reference, atol=1e-2, rtol=1e-6)  # counts up to 65535
    same_shape = resample_to_shape(upload(volume, CPU), volume.shape)
    assert np.array_equal(same_shape.numpy(), volume.astype(np.float32))


def test_device_volumes_must_be_three_dimensional_and_uint16_bits_int16():
    with pytest.raises(ValueError, match="3-D"):
        upload(np.zeros((4, 4), np.uint16), CPU)
    with pytest.raises(ValueError, match="int16"):
        DeviceVolume(torch.zeros(2, 2, 2), unsigned16=True)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: compares the GPU path with the CPU path"
)
def test_cuda_upload_matches_the_cpu():
    volume = _uint16((70, 33, 31), seed=4)  # more than one 32-plane slab
    cpu, gpu = upload(volume, CPU), upload(volume, torch.device("cuda"))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.planes(0, 70).cpu(), cpu.planes(0, 70))
    assert gpu.percentile_bounds() == cpu.percentile_bounds()
