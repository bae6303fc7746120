"""The per-case safeguard: how much of the networks' change a case gets, from how close its view is.

Why: a view that is already close to its fused truth has little to gain and much to lose. On
validation pairs the networks' whole change made such cases clearly worse than their input
(N_SSIM down to -4 where SSIM(input, fused) is 0.95-0.97), while far views gained most from
all of it. The truth is unknown at inference, but the networks' own prediction estimates it:
SSIM(0.6 um input, 0.6 um prediction), the case's *closeness*, follows SSIM(input, fused)
(figures: resources/weights/MODEL_CARD.md, "How it was trained"). A case at or above the
card's ``closeness_threshold`` gets ``close_change_strength`` of the change, any other case
``change_strength``. Both strengths and the threshold are fitted on validation pairs
(:mod:`fmc.training.safeguard_fit`); a threshold of 1 turns the gate off (every case gets
``change_strength``, and closeness is never computed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fmc.method import MethodSettings
from fmc.metrics import SSIM_RADIUS, ssim3d

log = logging.getLogger(__name__)

#: The gate's threshold that turns it off.
GATE_OFF = 1.0


@dataclass(frozen=True)
class GateDecision:
    """What the gate chose for one case, for the log and the run report."""

    closeness: float | None  # SSIM(input, prediction) at 0.6 um; None when the gate is off
    strength: float  # the share of the networks' change added


def closeness(iso: torch.Tensor, prediction: torch.Tensor) -> float:
    """SSIM of the 0.6 um input and prediction, both in the pipeline's normalized units (range ~1).

    A volume too thin for the SSIM window (an axis under 11 voxels) counts as close (1.0): the
    gate then takes the cautious strength.
    """
    if min(iso.shape) < 2 * SSIM_RADIUS + 1:
        return 1.0
    return float(ssim3d(iso, prediction, device=iso.device))


def gated_strength(far: float, close: float, threshold: float, value: float | None) -> float:
    """The gate's rule: ``close`` for a closeness ``value`` at or above ``threshold`` (below
    :data:`GATE_OFF`), else ``far``; None: not measured, so ``far``."""
    if value is None or threshold >= GATE_OFF or value < threshold:
        return far
    return close


def strength_for(settings: MethodSettings, value: float | None) -> float:
    """The share of the change a case of closeness ``value`` gets under ``settings``."""
    return gated_strength(
        settings.change_strength, settings.close_change_strength, settings.closeness_threshold, value
    )


def decide(settings: MethodSettings, iso: torch.Tensor, prediction: torch.Tensor) -> GateDecision:
    """The strength this case gets under ``settings`` (module docstring), logged."""
    if settings.closeness_threshold >= GATE_OFF:
        return GateDecision(None, settings.change_strength)
    value = closeness(iso, prediction)
    strength = strength_for(settings, value)
    log.info(
        "safeguard: closeness %.3f %s %.3f, %.2f of the networks' change added",
        value,
        ">=" if value >= settings.closeness_threshold else "<",
        settings.closeness_threshold,
        strength,
    )
    return GateDecision(value, strength)
