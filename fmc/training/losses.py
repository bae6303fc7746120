"""Generator and discriminator losses: alpha*MAE + beta*adversarial, plus optional SSIM / Pearson / cosine.

All inputs are ``(B, C, Z, Y, X)`` percentile-normalized volumes (about [0, 1]); losses
are computed in float32 whatever the autocast dtype, since SSIM's variances underflow in
bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the reconstruction terms; zero switches a term off (it is then not computed)."""

    alpha: float = 1.0  # MAE
    ssim: float = 0.0
    pearson: float = 0.0
    cosine: float = 0.0


def _gaussian_kernel(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(volume: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over the three spatial axes, 'valid' borders (as in the SSIM paper)."""
    channels = volume.shape[1]
    size = kernel.numel()
    out = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = size
        weight = kernel.reshape(shape).expand(channels, 1, *shape[2:])
        out = F.conv3d(out, weight, groups=channels)
    return out


def ssim3d_loss(
    pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """``1 - mean SSIM``, differentiable, defined as fmc.metrics.ssim3d (11^3 Gaussian window, sigma 1.5,
    valid region, data range 1), so the loss optimizes the score that is reported."""
    pred, target = pred.float(), target.float()
    window = min(window, *pred.shape[-3:])
    kernel = _gaussian_kernel(window, sigma, pred.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_p, mu_t = _blur(pred, kernel), _blur(target, kernel)
    var_p = _blur(pred * pred, kernel) - mu_p**2
    var_t = _blur(target * target, kernel) - mu_t**2
    cov = _blur(pred * target, kernel) - mu_p * mu_t
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return 1 - ssim.mean()


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - r`` per sample, averaged: rewards the right contrast whatever the offset and scale."""
    p = pred.float().flatten(1)
    t = target.float().flatten(1)
    p = p - p.mean(dim=1, keepdim=True)
    t = t - t.mean(dim=1, keepdim=True)
    r = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1) + eps)
    return (1 - r).mean()


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pred, target)`` per sample on the flattened volumes."""
    return (
        1 - F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=1, eps=1e-6)
    ).mean()


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled terms and each term (unweighted) for logging."""
    parts: dict[str, torch.Tensor] = {"mae": F.l1_loss(pred.float(), target.float())}
    total = weights.alpha * parts["mae"]
    if weights.ssim:
        parts["ssim"] = ssim3d_loss(pred, target)
        total = total + weights.ssim * parts["ssim"]
    if weights.pearson:
        parts["pearson"] = pearson_loss(pred, target)
        total = total + weights.pearson * parts["pearson"]
    if weights.cosine:
        parts["cosine"] = cosine_loss(pred, target)
        total = total + weights.cosine * parts["cosine"]
    return total, parts


def generator_adversarial_loss(fake_logits: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """The generator wants the discriminator to call its output real (non-saturating BCE or LSGAN)."""
    fake_logits = fake_logits.float()
    if mode == "lsgan":
        return F.mse_loss(fake_logits, torch.ones_like(fake_logits))
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str = "bce"
) -> torch.Tensor:
    """Half real-vs-one plus half fake-vs-zero."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if mode == "lsgan":
        real = F.mse_loss(real_logits, torch.ones_like(real_logits))
        fake = F.mse_loss(fake_logits, torch.zeros_like(fake_logits))
    else:
        real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)
