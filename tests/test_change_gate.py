"""The safeguard's closeness gate: a close case gets the cautious strength, a far one the other."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_baselines import SPACING, _untrained_correction_models, _volume

from fmc.change_gate import GATE_OFF, closeness, decide, strength_for
from fmc.method import MethodSettings
from fmc.pipeline import FusionPipeline, PipelineConfig
from fmc.tiling import TilingConfig

GATED = MethodSettings(change_strength=0.75, close_change_strength=0.25, closeness_threshold=0.9)


def test_the_strength_follows_the_threshold():
    assert strength_for(GATED, 0.89) == 0.75
    assert strength_for(GATED, 0.9) == 0.25  # at the threshold a case is close
    assert strength_for(GATED, None) == 0.75
    off = replace(GATED, closeness_threshold=GATE_OFF)
    assert strength_for(off, 0.99) == 0.75


def test_closeness_is_the_ssim_of_input_and_prediction():
    rng = np.random.default_rng(0)
    iso = torch.from_numpy(rng.random((16, 20, 20), dtype=np.float32))
    assert closeness(iso, iso.clone()) == pytest.approx(1.0)
    noisy = iso + torch.from_numpy(rng.normal(0, 0.3, iso.shape).astype(np.float32))
    assert closeness(iso, noisy) < 0.7
    thin = iso[:8]
    assert closeness(thin, thin + 1) == 1.0  # too thin for the SSIM window: counts as close


def test_the_gate_off_never_measures():
    iso = torch.zeros(4, 4, 4)  # would be refused by the SSIM window if it were measured
    decision = decide(replace(GATED, closeness_threshold=GATE_OFF), iso, iso + 1)
    assert decision.closeness is None and decision.strength == 0.75


def _changing_models():
    models = _untrained_correction_models("none")
    torch.nn.init.constant_(models.step2.network.head.bias, 0.2)
    return models


def test_the_pipeline_gives_a_close_case_the_close_strength():
    models = _changing_models()
    tiling = TilingConfig(patch=(16, 16, 16), batch=2)
    volume = _volume()

    def run(**settings):
        pipeline = FusionPipeline(models, PipelineConfig(tiling=tiling, **settings))
        return pipeline.run(volume, SPACING)[0], pipeline.gate

    full, gate = run(change_strength=1.0)
    assert gate.closeness is None and gate.strength == 1.0 and np.abs(full.astype(float) - volume).mean() > 10
    # every case is close from a threshold of 0: it gets the close strength (0: the input itself)
    held, gate = run(change_strength=1.0, close_change_strength=0.0, closeness_threshold=0.0)
    assert 0.0 < gate.closeness < 1.0 and gate.strength == 0.0
    assert np.array_equal(held, volume)
    # a threshold above the case's closeness: far, the whole change
    far, gate = run(change_strength=1.0, close_change_strength=0.0, closeness_threshold=gate.closeness + 1e-3)
    assert gate.strength == 1.0 and np.array_equal(far, full)


def test_each_setting_matches_run_with_the_gate_on():
    models = _changing_models()
    tiling = TilingConfig(patch=(16, 16, 16), batch=2)
    volume = _volume()
    pipeline = FusionPipeline(
        models, PipelineConfig(tiling=tiling, close_change_strength=0.25, closeness_threshold=0.0)
    )
    expected = pipeline.run(volume, SPACING)[0]
    variants = [pipeline.settings, replace(pipeline.settings, closeness_threshold=GATE_OFF)]
    gated, ungated = pipeline.run_each_setting(volume, SPACING, variants)
    assert np.array_equal(gated, expected)
    assert not np.array_equal(ungated, expected)
    assert pipeline.closeness_by_dw["none"] == pytest.approx(pipeline.gate.closeness)
