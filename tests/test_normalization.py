"""fmc.normalization: percentile bounds and normalization, the uint16 mappings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmc import normalization


def test_percentile_normalize_maps_p2_to_0_and_p998_to_1() -> None:
    x = (np.random.default_rng(3).gamma(2.0, 900.0, size=(10, 40, 50)) + 100).astype(np.uint16)
    out = normalization.percentile_normalize(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == x.shape
    assert np.percentile(out, 2) == pytest.approx(0.0, abs=1e-5)
    assert np.percentile(out, 99.8) == pytest.approx(1.0, abs=1e-5)
    assert out.min() < 0 and out.max() > 1  # no clipping
    t = normalization.percentile_normalize(torch.from_numpy(x.astype(np.float32)))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, atol=1e-6)


def test_percentile_normalize_constant_input_gives_zeros() -> None:
    for x in (np.full((5, 6, 7), 1234, np.uint16), torch.full((5, 6, 7), 3.5)):
        with np.errstate(all="raise"):
            out = normalization.percentile_normalize(x)
        values = out.numpy() if isinstance(out, torch.Tensor) else out
        assert values.dtype == np.float32 and np.all(values == 0)


def test_percentile_normalize_does_not_modify_its_input() -> None:
    x = torch.linspace(0, 10, 1000)
    before = x.clone()
    normalization.percentile_normalize(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16])
def test_integer_percentiles_are_exact(dtype: type) -> None:
    info = np.iinfo(dtype)
    x = np.random.default_rng(4).integers(info.min, info.max, size=(7, 33, 41), endpoint=True).astype(dtype)
    assert normalization.percentile_bounds(x) == pytest.approx(tuple(np.percentile(x, [2, 99.8])), abs=1e-9)


def test_large_volume_percentiles_use_a_close_subsample(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(5).random((20, 50, 50)).astype(np.float32)
    exact = np.percentile(x, [2, 99.8])
    monkeypatch.setattr(normalization, "NUMPY_EXACT_PERCENTILE_MAX", 5000)
    monkeypatch.setattr(normalization, "TORCH_EXACT_PERCENTILE_MAX", 5000)
    assert normalization.percentile_bounds(x) == pytest.approx(tuple(exact), abs=0.01)
    assert normalization.percentile_bounds(torch.from_numpy(x)) == pytest.approx(tuple(exact), abs=0.01)


def test_to_input_range_uint16_clips_rounds_and_spans_the_whole_range() -> None:
    normalized = torch.tensor([0.0, 1.0, -3.0, 2.0, 0.25, 0.75])
    # low 1000, high 1000 + 64535: x * 64535 + 1000, clipped to [0, 65535], rounded
    out = normalization.to_input_range_uint16(normalized, 1000.0, 65535.0)
    assert out.dtype == np.uint16
    assert out.tolist() == [1000, 65535, 0, 65535, round(0.25 * 64535 + 1000), round(0.75 * 64535 + 1000)]


def test_clip_to_uint16_clips_rounds_and_zeroes_nan() -> None:
    volume = np.array([[[-5.0, 0.4, 0.6, 70000.0, np.nan, np.inf]]])
    assert normalization.clip_to_uint16(volume).tolist() == [[[0, 0, 1, 65535, 0, 65535]]]
    ints = np.array([[[-1, 7, 70000]]], dtype=np.int32)
    assert normalization.clip_to_uint16(ints).tolist() == [[[0, 7, 65535]]]
