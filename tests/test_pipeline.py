"""The two-step pipeline: eq. (2), step switches, planner fallback, identity plumbing, determinism."""

import logging
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fmc.acceleration import KernelOptions
from fmc.network import RUNet, preset
from fmc.pipeline import FusionPipeline, PipelineConfig, StepTwoInputs, with_flips
from fmc.resample import resample_to_shape
from fmc.safeguards import Budget
from fmc.tiling import TilingConfig
from fmc.weights import LoadedModel, ModelCard, ModelSet


class FirstChannel(nn.Module):
    """An identity 'network': returns channel 0, so the whole pipeline must reproduce its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def _loaded(network: nn.Module, step: int, in_channels: int, preset_name: str = "identity") -> LoadedModel:
    card = ModelCard(
        step=step,
        preset=preset_name,
        config={"in_channels": in_channels},
        normalization={"method": "percentile", "low": 2.0, "high": 99.8},
    )
    return LoadedModel(network=network, card=card, path=None)


def _tiny(step: int, in_channels: int, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    config = preset("tiny", in_channels=in_channels)
    return _loaded(RUNet(config).eval(), step, in_channels, "tiny")


def _volume(shape=(20, 40, 36), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=[-(-s // 4) for s in shape])
    big = np.kron(base, np.ones((4, 4, 4)))[: shape[0], : shape[1], : shape[2]]
    return (1000 + 300 * big + rng.normal(scale=20, size=shape)).clip(0, 65535).astype(np.uint16)


SMALL_TILING = TilingConfig(patch=(16, 16, 16), overlap=0.25, batch=2)


def test_step_two_inputs_match_the_stacked_full_resolution_channels():
    iso = torch.rand(30, 41, 37, generator=torch.Generator().manual_seed(0))
    small = torch.rand(12, 12, 12, generator=torch.Generator().manual_seed(1))
    distance = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(2))
    stacked = torch.stack([iso, resample_to_shape(small, iso.shape), resample_to_shape(distance, iso.shape)])
    two = StepTwoInputs(iso, small, ("image", "step1"))
    three = StepTwoInputs(iso, small, ("image", "step1", "distance"), distance_small=distance)
    one = StepTwoInputs(iso, small, ("image",))
    without_step1 = StepTwoInputs(iso, None, ("image", "step1"))
    box = (slice(3, 19), slice(20, 36), slice(0, 16))
    torch.testing.assert_close(
        two.patch((3, 20, 0), (16, 16, 16)), stacked[(slice(0, 2), *box)], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        three.patch((3, 20, 0), (16, 16, 16)), stacked[(slice(None), *box)], atol=1e-5, rtol=0
    )
    batch = three.patch((3, 20, 0), (16, 16, 16))[None]
    assert torch.equal(three.step_one_channel(batch), batch[:, 1:2])  # the step-1 channel, not the last
    assert torch.equal(one.patch((3, 20, 0), (16, 16, 16)), iso[box][None])
    assert torch.equal(without_step1.patch((3, 20, 0), (16, 16, 16)), torch.stack([iso[box], iso[box]]))
    with pytest.raises(ValueError, match="must start with 'image'"):
        StepTwoInputs(iso, small, ("step1",))
    with pytest.raises(ValueError, match="distance_small"):
        StepTwoInputs(iso, small, ("image", "distance"))


def test_identity_networks_reproduce_the_input():
    volume = _volume()
    models = ModelSet(step1=None, step2=_loaded(FirstChannel(), 2, 2), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(step1=False, max_filter=1, tiling=SMALL_TILING))
    out, timings = pipe.run(volume, (0.6, 0.6, 0.6))
    assert out.shape == volume.shape and out.dtype == np.uint16
    assert np.abs(out.astype(np.int32) - volume.astype(np.int32)).max() <= 1
    assert {"normalize", "resample_in", "step2", "dw", "resample_out"} <= set(timings)


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(global_size=32, tiling=SMALL_TILING),
        PipelineConfig(global_size=32, step2=False, tiling=SMALL_TILING),
        PipelineConfig(global_size=32, step1=False, tiling=SMALL_TILING),
        PipelineConfig(global_size=32, difference_weighting="none", tta=True, tiling=SMALL_TILING),
    ],
    ids=["two-step", "step1-only", "step2-only", "no-dw-tta"],
)
def test_every_ablation_writes_a_valid_volume(config):
    volume = _volume((18, 30, 26))
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    out, timings = FusionPipeline(models, config).run(volume, (1.0, 0.4, 0.4))
    assert out.shape == volume.shape and out.dtype == np.uint16
    assert ("step1" in timings) == config.step1
    assert ("step2" in timings) == config.step2


def test_same_input_same_output_on_cpu():
    volume = _volume((18, 30, 26))
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING))
    first, _ = pipe.run(volume, (1.0, 0.4, 0.4))
    second, timings = pipe.run(volume, (1.0, 0.4, 0.4))
    assert np.array_equal(first, second)
    # every timed stage also has its memory high-water mark (process RSS here), never decreasing
    assert list(pipe.memory_high_water_gib) == list(timings)
    marks = list(pipe.memory_high_water_gib.values())
    assert marks == sorted(marks) and marks[0] > 0


def test_one_network_pass_per_dw_form_gives_the_bytes_of_a_full_run_with_that_form():
    volume = _volume((18, 30, 26))
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    base = PipelineConfig(global_size=32, tiling=SMALL_TILING, difference_weighting="none")
    shared = FusionPipeline(models, base).run_each_dw(volume, (1.0, 0.4, 0.4), ("none", "paper", "released"))
    for form, prediction in shared.items():
        alone, _ = FusionPipeline(models, replace(base, difference_weighting=form)).run(
            volume, (1.0, 0.4, 0.4)
        )
        assert np.array_equal(prediction, alone), form
    assert not np.array_equal(shared["none"], shared["paper"])
    assert not np.array_equal(shared["paper"], shared["released"])


def test_a_uint16_input_gives_the_same_output_as_its_float32_copy():
    volume = _volume((18, 30, 26))
    volume[0, 0, :3] = (40000, 65535, 32768)  # the upper half of the range, held as int16 bits
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING))
    from_bits, _ = pipe.run(volume, (1.0, 0.4, 0.4))
    from_floats, _ = pipe.run(volume.astype(np.float32), (1.0, 0.4, 0.4))
    assert np.array_equal(from_bits, from_floats)


def test_the_prediction_can_overwrite_the_input_array():
    volume = _volume((18, 30, 26))
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING))
    expected, _ = pipe.run(volume, (1.0, 0.4, 0.4))
    in_place = volume.copy()
    got, _ = pipe.run(in_place, (1.0, 0.4, 0.4), out=in_place)
    assert got is in_place and np.array_equal(got, expected) and not np.array_equal(got, volume)
    with pytest.raises(ValueError, match="writeable uint16"):
        pipe.run(volume, (1.0, 0.4, 0.4), out=volume.astype(np.float32))


def test_expired_budget_falls_back_to_step_one_and_still_writes(caplog):
    volume = _volume((18, 30, 26))
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING))
    with caplog.at_level(logging.INFO):
        out, _ = pipe.run(volume, (1.0, 0.4, 0.4), deadline=time.perf_counter() + 0.01)
    assert out.shape == volume.shape and out.dtype == np.uint16
    assert "step 1 only" in caplog.text
    with_step1_only, _ = FusionPipeline(models, PipelineConfig(global_size=32, step2=False)).run(
        volume, (1.0, 0.4, 0.4)
    )
    assert np.array_equal(out, with_step1_only)


def test_no_model_enabled_is_refused():
    with pytest.raises(ValueError, match="no model"):
        FusionPipeline(ModelSet(step1=None, step2=None, folder=None), PipelineConfig())


class OutOfMemoryAbove(nn.Module):
    """Identity on channel 0 that raises CUDA OOM for batches or patches above a limit."""

    def __init__(self, max_batch: int, max_patch: int) -> None:
        super().__init__()
        self.max_batch, self.max_patch, self.failures = max_batch, max_patch, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch or max(x.shape[2:]) > self.max_patch:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x[:, :1]


def test_out_of_memory_retries_with_smaller_batch_and_patch(caplog):
    volume = _volume()
    network = OutOfMemoryAbove(max_batch=1, max_patch=32)
    models = ModelSet(step1=None, step2=_loaded(network, 2, 2), folder=None)
    config = PipelineConfig(step1=False, max_filter=1, tiling=TilingConfig(patch=(64, 64, 64), batch=2))
    with caplog.at_level(logging.WARNING):
        out, _ = FusionPipeline(models, config).run(volume, (0.6, 0.6, 0.6))
    assert network.failures >= 2
    assert caplog.text.count("GPU out of memory") == network.failures
    assert np.abs(out.astype(np.int32) - volume.astype(np.int32)).max() <= 1


def test_out_of_memory_everywhere_on_device_ends_with_host_accumulation(monkeypatch, caplog):
    import fmc.safeguards as safeguards

    real = safeguards.sliding_window_inference
    hosts = []

    def device_always_full(volume, predictor, config, *, accumulate_on=None, **options):
        hosts.append(accumulate_on)
        if accumulate_on is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(volume, predictor, config, accumulate_on=accumulate_on, **options)

    monkeypatch.setattr(safeguards, "sliding_window_inference", device_always_full)
    volume = _volume()
    models = ModelSet(step1=None, step2=_loaded(FirstChannel(), 2, 2), folder=None)
    with caplog.at_level(logging.WARNING):
        out, _ = FusionPipeline(models, PipelineConfig(step1=False, max_filter=1, tiling=SMALL_TILING)).run(
            volume, (0.6, 0.6, 0.6)
        )
    assert hosts[-1] == "cpu" and all(h is None for h in hosts[:-1])
    assert "accumulating on the host" in caplog.text
    assert np.abs(out.astype(np.int32) - volume.astype(np.int32)).max() <= 1


def test_planner_without_step_one_times_a_real_batch_and_keeps_quality(caplog):
    volume = _volume()
    models = ModelSet(step1=None, step2=_loaded(FirstChannel(), 2, 2), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(step1=False, max_filter=1, tiling=SMALL_TILING))
    with caplog.at_level(logging.INFO):
        out, _ = pipe.run(volume, (0.6, 0.6, 0.6), deadline=time.perf_counter() + 3600)
    assert "fits" in caplog.text and "overlap" not in caplog.text.split("fits")[0].split("planner:")[-1]
    assert np.abs(out.astype(np.int32) - volume.astype(np.int32)).max() <= 1


class SlowAfterTheProbe(nn.Module):
    """A step-2 'network' (input + 5) whose first call, the planner's timed batch, is quick and the
    rest take 0.2 s each: a machine slower than the planner measured."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            time.sleep(0.2)
        return x[:, :1] + 5.0


def test_step_two_running_late_gives_its_last_patches_the_step_one_output(caplog):
    iso = torch.rand((64, 24, 24), generator=torch.Generator().manual_seed(0))
    slow = SlowAfterTheProbe()
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_loaded(slow, 2, 2), folder=None)
    config = PipelineConfig(global_size=32, difference_weighting="none", tiling=SMALL_TILING)
    pipeline = FusionPipeline(models, config)
    pipeline.predict_isotropic(iso[:16])  # first calls (allocations) before the clock
    slow.calls = 0
    deadline = time.perf_counter() + 1.2  # 20 patches in 10 batches would take 2 s
    with caplog.at_level(logging.INFO):
        out = pipeline.predict_isotropic(iso, budget=Budget(deadline, reserve_seconds=0.0))
    finished = time.perf_counter()
    assert "fits" in caplog.text and "time is up after" in caplog.text
    assert finished <= deadline + 0.3  # the last network batch may end a little late, not 0.8 s late
    assert 3 <= slow.calls <= 9  # the probe, then the first z rows of patches
    step_one = FusionPipeline(models, replace(config, step2=False)).predict_isotropic(iso)
    # patches start at z = 0, 12, ..., 48: z < 12 only saw the first row, z >= 52 only the last
    torch.testing.assert_close(out[:12], iso[:12] + 5.0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[52:], step_one[52:], atol=1e-4, rtol=0)


class OverflowsInACorner(nn.Module):
    """An identity step-2 'network' whose output overflows (inf, NaN) in one corner, as float16 can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :1].clone()
        out[..., :3, :3, :3] = float("inf")
        out[..., -2:, -2:, -2:] = float("nan")
        return out


@pytest.mark.parametrize("step", [1, 2])
def test_non_finite_network_output_takes_the_input_values_and_is_logged(caplog, step):
    volume = _volume((32, 32, 32))  # at 0.6 um and global size 32, step 1's resampling is exact
    network = _loaded(OverflowsInACorner(), step, step)
    models = ModelSet(step1=network if step == 1 else None, step2=network if step == 2 else None, folder=None)
    config = PipelineConfig(
        step1=step == 1, step2=step == 2, global_size=32, difference_weighting="none", tiling=SMALL_TILING
    )
    with caplog.at_level(logging.WARNING):
        out, _ = FusionPipeline(models, config).run(volume, (0.6, 0.6, 0.6))
    assert "were not finite" in caplog.text
    assert "--precision fp32" not in caplog.text, "a float32 run blames no float16 overflow (issue 22, E)"
    assert np.abs(out.astype(np.int32) - volume.astype(np.int32)).max() <= 1


def test_compiled_networks_are_built_once_per_pipeline(monkeypatch):
    calls = []
    original = torch.compile

    def eager_backend_compile(model, **kwargs):  # dynamo with the eager backend: no C++ toolchain
        calls.append(kwargs.get("mode"))
        return original(model, backend="eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    torch._dynamo.reset()
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    config = PipelineConfig(global_size=32, tiling=SMALL_TILING, kernels=KernelOptions(compile="default"))
    pipe = FusionPipeline(models, config)
    volume = _volume((18, 30, 26))
    first, _ = pipe.run(volume, (1.0, 0.4, 0.4))
    second, _ = pipe.run(volume, (1.0, 0.4, 0.4))
    assert calls == ["default", "default"]  # step 1 and step 2, not again on the second case
    eager, _ = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING)).run(
        volume, (1.0, 0.4, 0.4)
    )
    assert np.abs(first.astype(int) - eager.astype(int)).max() <= 1 and np.array_equal(first, second)


def test_the_input_on_the_device_is_freed_before_the_networks_run(monkeypatch):
    """On a GPU it is a large buffer (2.1 GiB for study 5): it must not live through steps 1-2."""
    import weakref

    import fmc.pipeline as pipeline_module

    refs = []
    to_device = pipeline_module.upload

    def recording(volume, device):
        uploaded = to_device(volume, device)
        refs.append(weakref.ref(uploaded))
        return uploaded

    alive_during_networks = []
    predict = FusionPipeline.predict_isotropic

    def checking(self, iso, *args, **kwargs):
        alive_during_networks.append(refs[-1]() is not None)
        return predict(self, iso, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "upload", recording)
    monkeypatch.setattr(FusionPipeline, "predict_isotropic", checking)
    models = ModelSet(step1=_tiny(1, 1, 0), step2=_tiny(2, 2, 1), folder=None)
    pipe = FusionPipeline(models, PipelineConfig(global_size=32, tiling=SMALL_TILING))
    pipe.run(_volume(), (1.0, 0.4, 0.4))
    assert alive_during_networks == [False]


def test_test_time_flips_average_the_flipped_predictions_back_in_place():
    batch = torch.rand((2, 1, 5, 6, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(with_flips(lambda b: b * 2.0)(batch), batch * 2.0)  # flip-equivariant: unchanged
    ramp = torch.arange(7.0).expand(2, 1, 5, 6, 7)
    # a 'network' that ignores its input and returns a ramp along x: flipped back, x's flip mirrors it
    expected = (3 * ramp + ramp.flip(4)) / 4
    torch.testing.assert_close(with_flips(lambda b: ramp.clone())(batch), expected)
