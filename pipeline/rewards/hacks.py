"""Reward-hacking controls: cheap edits of a restored image that a good IQA reward must not
prefer to the image itself. Used as hard negatives when the reward model
trains, and as control rows next to RL in every evaluation: an RL gain smaller than a
dither's is no gain. All take and return (N, 3, H, W) tensors in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _box3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def dither(x: torch.Tensor, generator: torch.Generator | None = None, sigma: float = 1 / 255) -> torch.Tensor:
    """Gaussian noise of sigma = 1/255 (in [0, 1] units)."""
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    return (x + 2 * sigma * noise).clamp(-1, 1)


def unsharp(x: torch.Tensor, generator=None, amount: float = 0.5) -> torch.Tensor:
    return (x + amount * (x - _box3(x))).clamp(-1, 1)


def blur(x: torch.Tensor, generator=None) -> torch.Tensor:
    return _box3(x)


def contrast(x: torch.Tensor, generator=None, factor: float = 1.05) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(-1, 1)


HACKS = {"dither": dither, "unsharp": unsharp, "blur": blur, "contrast": contrast}
