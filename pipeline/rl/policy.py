"""DDIM steps as a Gaussian policy: per-step log-probabilities and the closed-form KL.

Following DDPO (Black et al.): with eta > 0 each DDIM step x_t -> x_prev is N(mean, std^2 I).
Log-probabilities are the *pixel mean* of the Gaussian log-density (a sum over pixels
overflows the importance ratio); steps whose std is below a floor (the final DDIM step has
std 0) carry no policy and are masked out rather than producing NaN.
"""

from __future__ import annotations

import math

import torch

STD_FLOOR = 1e-4


def step_mask(stds: list[float], floor: float = STD_FLOOR) -> torch.Tensor:
    """1 for steps that are a stochastic policy step, 0 for (near-)deterministic ones."""
    return torch.tensor([1.0 if s > floor else 0.0 for s in stds])


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Per-sample pixel-mean log N(x_prev; mean, std^2 I); zeros where std is below the floor."""
    if std <= STD_FLOOR:
        return torch.zeros(x_prev.shape[0], device=x_prev.device)
    log_density = (-((x_prev.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
    return log_density.mean(dim=(1, 2, 3))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: float) -> torch.Tensor:
    """Per-sample pixel-mean KL(N(mean, s^2) || N(ref_mean, s^2)) = |mean - ref|^2 / (2 s^2)."""
    if std <= STD_FLOOR:
        return torch.zeros(mean.shape[0], device=mean.device)
    return ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
