"""Difficulty-adaptive mixing of the RL and SFT losses (seed paper 000, our reading).

Difficulty of a sample = reward(GT) - reward(model output): how far the model still is from
its ground truth in reward terms. Its relative difficulty is its quantile among a running
window of recent difficulties; the RL weight ramps linearly from 0 at quantile `q_lo` to 1 at
`q_hi`. Hard samples get the RL loss, easy ones (already close to GT) the SFT loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def quantiles(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Empirical quantile of each value within `reference` (share of reference below it)."""
    if reference.numel() == 0:
        return torch.full_like(values, 0.5)
    below = (reference[None, :] < values[:, None]).float().mean(dim=1)
    equal = (reference[None, :] == values[:, None]).float().mean(dim=1)
    return below + 0.5 * equal


def rl_weights(q: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """w = clip((q - q_lo) / (q_hi - q_lo), 0, 1): monotone in q, within [0, 1]."""
    if not 0.0 <= q_lo < q_hi <= 1.0:
        raise ValueError(f"need 0 <= q_lo < q_hi <= 1, got q_lo={q_lo}, q_hi={q_hi}")
    return ((q - q_lo) / (q_hi - q_lo)).clamp(0.0, 1.0)


class DifficultyTracker:
    """Running window of difficulties, seeded from the `score` stage, refreshed by rollouts."""

    def __init__(self, initial: torch.Tensor, window: int = 512):
        self.window = window
        self.values = initial.flatten()[-window:].float()

    def update(self, difficulties: torch.Tensor) -> None:
        self.values = torch.cat([self.values, difficulties.detach().flatten().float()])[-self.window:]

    def weights(self, difficulties: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
        return rl_weights(quantiles(difficulties, self.values), q_lo, q_hi)

    def state_dict(self) -> dict:
        return {"values": self.values, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.window = state["values"], state["window"]


def sample_difficulty(reward_gt: torch.Tensor, reward_out: torch.Tensor, ssim: torch.Tensor,
                      fidelity_weight: float) -> torch.Tensor:
    """Reward gap to the GT plus a fidelity distance: r(GT) - r(out) + f * (1 - SSIM)."""
    return reward_gt - reward_out + fidelity_weight * (1 - ssim)


def adaptive_weights(tracker: DifficultyTracker, difficulties: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """Hard samples (high quantile among recent difficulties) get RL, easy ones SFT."""
    return tracker.weights(difficulties, q_lo, q_hi)


def uniform_weights(tracker: DifficultyTracker, difficulties: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """The ablation: every sample gets the adaptive rule's mean weight over uniform quantiles,
    1 - (q_lo + q_hi) / 2, so the RL/SFT mix is the same on average but blind to difficulty."""
    return torch.full_like(difficulties, 1 - (q_lo + q_hi) / 2, dtype=torch.float)


def rl_only_weights(tracker: DifficultyTracker, difficulties: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """No difficulty weighting: w = 1 for every sample, so the loss is the RL objective alone
    (no SFT term; the update skips computing it), as in DDPO, ReFL and the other seed methods."""
    return torch.ones_like(difficulties, dtype=torch.float)


@dataclass(frozen=True)
class Weighting:
    """A rule for each sample's RL weight w; `uses_sft`: whether any sample can get w < 1, i.e.
    whether the update needs the SFT loss at all (with w = 1 everywhere it is multiplied by 0)."""

    weights: Callable[[DifficultyTracker, torch.Tensor, float, float], torch.Tensor]
    uses_sft: bool


WEIGHTINGS: dict[str, Weighting] = {
    "adaptive": Weighting(adaptive_weights, uses_sft=True),
    "uniform": Weighting(uniform_weights, uses_sft=True),
    "rl_only": Weighting(rl_only_weights, uses_sft=False),
}


def mixed_loss(w: torch.Tensor, rl_loss: torch.Tensor, sft_loss: torch.Tensor, lambda_sft: float) -> torch.Tensor:
    """Per-sample w * L_RL + (1 - w) * lambda_sft * L_SFT."""
    return w * rl_loss + (1 - w) * lambda_sft * sft_loss


def draw_images(difficulties: torch.Tensor, n: int, oversample: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of `n` distinct samples: round(oversample * n) drawn with probability
    proportional to their difficulty quantile (hard ones more often), the rest uniformly."""
    total = difficulties.numel()
    if n > total:
        raise ValueError(f"cannot draw {n} distinct samples from {total}")
    n_hard = round(oversample * n)
    picked = torch.empty(0, dtype=torch.long)
    if n_hard:
        q = quantiles(difficulties, difficulties) + 1.0 / total
        picked = torch.multinomial(q, n_hard, replacement=False, generator=generator)
    if n_hard == n:
        return picked
    rest = torch.ones(total)
    rest[picked] = 0
    others = torch.multinomial(rest, n - n_hard, replacement=False, generator=generator)
    return torch.cat([picked, others])
