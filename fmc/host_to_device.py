"""The input volume's way to the device: a uint16 stack stays 16-bit until it is resampled.

Why: a float32 copy of the input is twice its size on the device, costs the host a conversion
before the copy and 4 bytes per voxel over the bus. Kept as 16 bits, it crosses the bus at 2
bytes per voxel, and each band of planes becomes float32 only when the resampling reads it
(memory: docs/performance.md, "What keeps fmc lean"). The bits travel as int16 (every backend can
hold and convert int16; PyTorch's uint16 has only limited support) and are read back as unsigned.

Resampling is linear with weights summing to 1, so resampling the raw counts and then
normalizing gives the same result as normalizing first.
"""

from __future__ import annotations

import numpy as np
import torch

from fmc.normalization import PERCENTILE_HIGH, PERCENTILE_LOW, percentile_bounds, percentiles_from_counts

UINT16_LEVELS = 1 << 16
_HISTOGRAM_CHUNK = 1 << 26  # voxels per bincount on the device


class DeviceVolume:
    """A (Z, Y, X) input volume on the device; ``planes(z0, z1)`` gives float32 planes.

    Uint16 input is held as its int16 bits; anything else as float32.
    """

    def __init__(self, data: torch.Tensor, unsigned16: bool) -> None:
        if data.dim() != 3:
            raise ValueError(f"volume must be 3-D (Z, Y, X), got shape {tuple(data.shape)}")
        if unsigned16 and data.dtype != torch.int16:
            raise ValueError(f"uint16 bits are held as int16, got {data.dtype}")
        self.data = data
        self.unsigned16 = unsigned16
        z, y, x = data.shape
        self.shape = (int(z), int(y), int(x))
        self.device = data.device

    def planes(self, z0: int, z1: int) -> torch.Tensor:
        """Planes ``z0:z1`` as float32 (a new tensor for uint16 input, a view otherwise)."""
        band = self.data[z0:z1]
        if not self.unsigned16:
            return band
        return band.to(torch.int32).bitwise_and_(UINT16_LEVELS - 1).to(torch.float32)

    def percentile_bounds(
        self, low: float = PERCENTILE_LOW, high: float = PERCENTILE_HIGH
    ) -> tuple[float, float]:
        """(p_low, p_high) as np.percentile's linear method; exact for uint16 (a device histogram)."""
        if not self.unsigned16:
            return percentile_bounds(self.data, low, high)
        flat = self.data.reshape(-1)
        counts = torch.zeros(UINT16_LEVELS, dtype=torch.int64, device=self.device)
        for start in range(0, flat.numel(), _HISTOGRAM_CHUNK):
            values = flat[start : start + _HISTOGRAM_CHUNK].to(torch.int32).bitwise_and_(UINT16_LEVELS - 1)
            counts += torch.bincount(values, minlength=UINT16_LEVELS)
        lo, hi = percentiles_from_counts(counts.cpu().numpy(), 0, (low, high))
        return lo, hi


def upload(volume: np.ndarray, device: torch.device, slab: int = 32) -> DeviceVolume:
    """Copy a ZYX array to ``device``, slab by slab so the host never holds a converted copy.

    On a CPU a contiguous, writeable uint16 array is shared, not copied (it is only read).
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (Z, Y, X), got shape {volume.shape}")
    unsigned16 = volume.dtype == np.uint16
    dtype = torch.int16 if unsigned16 else torch.float32
    if unsigned16 and device.type == "cpu" and volume.flags.c_contiguous and volume.flags.writeable:
        return DeviceVolume(torch.from_numpy(volume.view(np.int16)), True)
    out = torch.empty(volume.shape, dtype=dtype, device=device)
    for z in range(0, volume.shape[0], slab):
        part = volume[z : z + slab].view(np.int16) if unsigned16 else volume[z : z + slab].astype(np.float32)
        out[z : z + slab] = torch.from_numpy(np.ascontiguousarray(part)).to(device)
    return DeviceVolume(out, unsigned16)
