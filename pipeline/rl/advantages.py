"""Advantages from rewards of G rollouts per LQ image (GRPO/DDPO-style group baseline)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, clip: float = 5.0, eps: float = 1e-6,
                     std_scope: str = "group") -> torch.Tensor:
    """rewards (n_groups, G) -> advantages of the same shape.

    Reward minus its group mean, divided by the group's std ("group") or the batch's
    ("global"), clipped to [-clip, clip]. A group with identical rewards gets zeros.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std_scope == "group":
        std = rewards.std(dim=1, keepdim=True, unbiased=False)
    elif std_scope == "global":
        std = centred.std(unbiased=False).expand_as(centred[:, :1])
    else:
        raise ValueError(f"std_scope must be 'group' or 'global', not {std_scope!r}")
    return (centred / (std + eps)).clamp(-clip, clip)


def zero_variance_share(rewards: torch.Tensor, eps: float = 1e-8) -> float:
    """Share of groups whose rewards are all equal: they carry no learning signal."""
    return float((rewards.std(dim=1, unbiased=False) < eps).float().mean())
