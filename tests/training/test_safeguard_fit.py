"""The safeguard's choice on validation scores: never a case below the floor when a choice avoids it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmc.change_gate import GATE_OFF
from fmc.network import RUNet, preset
from fmc.normalization import CARD_NORMALIZATION
from fmc.training.safeguard_fit import WORST_ALLOWED, Choice, choose, grid, group_means, store
from fmc.weights import ModelCard, save_model

BOLD = Choice(1.0, 1.0, GATE_OFF, 0.0, 0.0)
CAREFUL = Choice(0.5, 0.5, GATE_OFF, 1.0, 0.5)
GATED = Choice(1.0, 0.5, 0.9, 1.0, 0.5)  # bold for far cases, careful for close ones


def _rows(cases: list[tuple[float, dict]]) -> list[dict]:
    """Rows as ``score_cases`` makes them; scores keyed (strength, noise weight, sigma)."""
    return [
        {
            "family": "calibrated",
            "case": f"image_{i}_nucleus",
            "channel": "nucleus",
            "closeness": c,
            "scores": s,
        }
        for i, (c, s) in enumerate(cases)
    ]


def test_the_best_mean_that_sinks_no_case_wins():
    rows = _rows(
        [
            (0.8, {(1.0, 0.0, 0.0): 0.60, (0.5, 1.0, 0.5): 0.10, (1.0, 1.0, 0.5): 0.50}),
            (0.95, {(1.0, 0.0, 0.0): -0.30, (0.5, 1.0, 0.5): 0.02, (1.0, 1.0, 0.5): -0.40}),
        ]
    )
    assert group_means(rows, BOLD)["nucleus calibrated"] == pytest.approx(0.15)
    # the gated choice reads the far case at strength 1 and the close one at 0.5
    assert group_means(rows, GATED)["nucleus calibrated"] == pytest.approx((0.50 + 0.02) / 2)
    assert choose(rows, [BOLD, CAREFUL]) == CAREFUL  # BOLD has the better mean but sinks a case
    assert choose(rows, [BOLD, CAREFUL, GATED]) == GATED  # safe and better than CAREFUL


def test_when_every_choice_sinks_a_case_the_least_bad_worst_case_wins():
    rows = _rows(
        [
            (0.8, {(1.0, 0.0, 0.0): -0.5, (0.5, 1.0, 0.5): -0.05}),
            (0.8, {(1.0, 0.0, 0.0): 0.3, (0.5, 1.0, 0.5): 0.2}),
        ]
    )
    assert all(min(r["scores"][k] for r in rows) < WORST_ALLOWED for k in rows[0]["scores"])
    assert choose(rows, [BOLD, CAREFUL]) == CAREFUL


def test_the_grid_never_gives_a_close_case_more_than_a_far_one():
    choices = grid()
    assert all(
        c.close_change_strength < c.change_strength for c in choices if c.closeness_threshold < GATE_OFF
    )
    assert any(c.closeness_threshold >= GATE_OFF for c in choices)  # the gate off is a choice too


def test_the_choice_goes_into_both_steps_cards(tmp_path: Path):
    config = preset("tiny", in_channels=1)
    for step in (1, 2):
        card = ModelCard(
            step=step, preset="tiny", config=config.to_dict(), normalization=dict(CARD_NORMALIZATION)
        )
        save_model(tmp_path / "any" / f"step{step}", RUNet(config), card)
    rows = _rows([(0.95, {(0.5, 1.0, 0.5): 0.1})])
    changed = store(tmp_path, GATED, rows, {"cases": 1})
    assert len(changed) == 2
    for path in changed:
        pipeline = json.loads(path.read_text())["training"]["pipeline"]
        assert pipeline["change_strength"] == 1.0 and pipeline["close_change_strength"] == 0.5
        assert pipeline["closeness_threshold"] == 0.9 and pipeline["detail_sigma"] == 0.5
