"""The baselines: the resample baseline is the pipeline with networks that change nothing, to the
last bit; the tuned Gaussian finds the sigma that made the data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from fmc.baselines import baseline_prediction, fit_sigma, resample_baseline, store_sigmas, stored_sigma
from fmc.network import RUNet, preset
from fmc.normalization import CARD_NORMALIZATION
from fmc.pipeline import FusionPipeline, PipelineConfig
from fmc.tiling import TilingConfig
from fmc.weights import LoadedModel, ModelCard, ModelSet, load_model, save_model

SPACING = (1.0, 0.39, 0.39)


def _volume(shape=(20, 48, 44), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return (1000 + 4000 * smooth + rng.normal(scale=30, size=shape)).clip(0, 65535).astype(np.uint16)


def _untrained_correction_models(dw: str, step2_residual: int = 1) -> ModelSet:
    """Networks as ``train.py fit --step1-mode correction`` starts them: zero heads."""
    pipeline = {"step1_mode": "correction", "difference_weighting": dw, "global_size": 16, "patch": 16}
    step2 = replace(preset("tiny", in_channels=2), residual_channel=step2_residual, zero_head=True)
    models = []
    for step, config in ((1, replace(preset("tiny", in_channels=1), zero_head=True)), (2, step2)):
        torch.manual_seed(step)
        card = ModelCard(
            step=step,
            preset="tiny",
            config=config.to_dict(),
            normalization={},
            training={"pipeline": pipeline},
        )
        models.append(LoadedModel(RUNet(config).eval(), card, None))
    return ModelSet(step1=models[0], step2=models[1], folder=None)


@pytest.mark.parametrize("dw", ["none", "released"])
@pytest.mark.parametrize("step2_residual", [0, 1])
def test_untrained_correction_pipeline_returns_its_input_to_the_last_bit(dw, step2_residual):
    """The change is added on the native grid: networks that change nothing give back the input."""
    volume = _volume()
    tiling = TilingConfig(patch=(16, 16, 16), overlap=0.5, batch=2)
    models = _untrained_correction_models(dw, step2_residual)
    pipeline = FusionPipeline(models, PipelineConfig(tiling=tiling))
    assert pipeline.correction and pipeline.settings.difference_weighting == dw
    fused, timings = pipeline.run(volume, SPACING)
    assert "step1" in timings and "step2" in timings  # both networks ran
    assert np.array_equal(fused, volume)
    # with none of the input's native detail kept, the output is the input's 0.6 um round trip
    round_trip, _ = FusionPipeline(models, PipelineConfig(tiling=tiling, native_detail=0.0)).run(
        volume, SPACING
    )
    expected = resample_baseline(volume, SPACING)
    assert np.array_equal(round_trip, expected)
    assert not np.array_equal(expected, volume)  # resampling does change the volume


def test_the_safeguard_strength_scales_the_change():
    """change_strength 0 returns the input whatever the networks do; 0.5 lands between."""
    models = _untrained_correction_models("none")
    torch.nn.init.constant_(models.step2.network.head.bias, 0.2)
    tiling = TilingConfig(patch=(16, 16, 16), batch=2)
    volume = _volume()
    full = FusionPipeline(models, PipelineConfig(tiling=tiling)).run(volume, SPACING)[0].astype(float)
    half = FusionPipeline(models, PipelineConfig(tiling=tiling, change_strength=0.5)).run(volume, SPACING)[0]
    none = FusionPipeline(models, PipelineConfig(tiling=tiling, change_strength=0.0)).run(volume, SPACING)[0]
    assert np.array_equal(none, volume)
    assert np.abs(full - volume).mean() > 10
    assert np.abs(half - (volume + full) / 2).max() <= 1.0  # rounding only


def test_step_two_on_the_input_ignores_a_trained_step_one_until_it_is_trained():
    """Residual on channel 0: step 1's output is context only, so an untrained step 2 still gives
    the input however step 1 was trained."""
    models = _untrained_correction_models("none", step2_residual=0)
    torch.nn.init.constant_(models.step1.network.head.bias, 0.05)
    pipeline = FusionPipeline(models, PipelineConfig(tiling=TilingConfig(patch=(16, 16, 16), batch=2)))
    volume = _volume()
    assert np.array_equal(pipeline.run(volume, SPACING)[0], volume)
    step1_only = FusionPipeline(models, PipelineConfig(step2=False))
    assert not np.array_equal(step1_only.run(volume, SPACING)[0], volume)


def test_a_trained_step_changes_the_correction_pipeline():
    """The test above is not vacuous: a non-zero head moves the output away from the input."""
    models = _untrained_correction_models("none")
    torch.nn.init.constant_(models.step2.network.head.bias, 0.05)
    pipeline = FusionPipeline(models, PipelineConfig(tiling=TilingConfig(patch=(16, 16, 16), batch=2)))
    volume = _volume()
    assert not np.array_equal(pipeline.run(volume, SPACING)[0], volume)


def test_fit_sigma_recovers_the_sigma_that_made_the_target():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(2):
        source = rng.normal(100, 20, (24, 40, 40)).astype(np.float32)
        pairs.append((source, ndimage.gaussian_filter(source, 1.3)))
    sigma, score = fit_sigma(pairs)
    assert sigma == pytest.approx(1.3, abs=0.03)
    assert score > 0.95


def test_sigmas_are_stored_in_the_cards_and_read_back(tmp_path):
    stem = tmp_path / "any" / "step1"
    config = preset("tiny", in_channels=1)
    save_model(
        stem,
        RUNet(config),
        ModelCard(step=1, preset="tiny", config=config.to_dict(), normalization=dict(CARD_NORMALIZATION)),
    )
    assert stored_sigma(load_model(stem).card.training, "nucleus") is None
    changed = store_sigmas(tmp_path, {"nucleus": 1.1, "membrane": 0.7}, {"data": "x"})
    assert changed == [stem.with_suffix(".json")]
    training = load_model(stem).card.training
    assert stored_sigma(training, "nucleus") == 1.1 and stored_sigma(training, "membrane") == 0.7


def test_baseline_prediction_names_and_refusals():
    volume = _volume((12, 16, 16))
    assert baseline_prediction("identity", volume, "nucleus", SPACING) is volume
    tuned = baseline_prediction("gaussian-tuned", volume, "nucleus", SPACING, sigma=2.0)
    assert np.allclose(tuned, ndimage.gaussian_filter(volume.astype(np.float32), 2.0))
    with pytest.raises(ValueError, match="fitted sigma"):
        baseline_prediction("gaussian-tuned", volume, "nucleus", SPACING)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_prediction("median", volume, "nucleus", SPACING)
