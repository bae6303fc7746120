"""The safeguard's choice on validation scores: never a case below the floor when a choice avoids it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmc.network import RUNet, preset
from fmc.normalization import CARD_NORMALIZATION
from fmc.training.safeguard_fit import WORST_ALLOWED, choose, group_means, store
from fmc.weights import ModelCard, save_model

BOLD, CAREFUL, TIMID = (1.0, 0.0, 0.0), (0.5, 1.0, 0.5), (0.25, 1.0, 0.0)
GRID = [BOLD, CAREFUL, TIMID]


def _rows(scores: list[dict]) -> list[dict]:
    return [
        {"family": "calibrated", "case": f"image_{i}_nucleus", "channel": "nucleus", "scores": s}
        for i, s in enumerate(scores)
    ]


def test_the_best_mean_that_sinks_no_case_wins():
    rows = _rows(
        [
            {BOLD: 0.60, CAREFUL: 0.10, TIMID: 0.05},
            {BOLD: -0.30, CAREFUL: 0.02, TIMID: 0.01},
        ]
    )
    assert group_means(rows, BOLD)["nucleus calibrated"] == pytest.approx(0.15)
    assert group_means(rows, BOLD)["nucleus calibrated"] > group_means(rows, CAREFUL)["nucleus calibrated"]
    assert choose(rows, GRID) == CAREFUL  # BOLD has the better mean but sinks a case


def test_when_every_choice_sinks_a_case_the_least_bad_worst_case_wins():
    rows = _rows([{BOLD: -0.5, CAREFUL: -0.2, TIMID: -0.05}, {BOLD: 0.3, CAREFUL: 0.2, TIMID: 0.0}])
    assert all(min(r["scores"][c] for r in rows) < WORST_ALLOWED for c in GRID)
    assert choose(rows, GRID) == TIMID


def test_the_choice_goes_into_both_steps_cards(tmp_path: Path):
    config = preset("tiny", in_channels=1)
    for step in (1, 2):
        card = ModelCard(
            step=step, preset="tiny", config=config.to_dict(), normalization=dict(CARD_NORMALIZATION)
        )
        save_model(tmp_path / "any" / f"step{step}", RUNet(config), card)
    rows = _rows([{CAREFUL: 0.1}])
    changed = store(tmp_path, CAREFUL, rows, {"cases": 1})
    assert len(changed) == 2
    for path in changed:
        pipeline = json.loads(path.read_text())["training"]["pipeline"]
        assert pipeline["change_strength"] == 0.5 and pipeline["detail_noise_weight"] == 1.0
        assert pipeline["detail_sigma"] == 0.5
