"""The sampling phase of RL: G rollouts per LQ image with everything the update needs.

As in DDPO's two phases (kvablack/ddpo-pytorch), sampling runs without gradients and records
each step's x_t, x_prev, log-probability and predicted clean image; the training phase later
recomputes log-probs of the same transitions under the current weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.rl.policy import gaussian_log_prob, step_mask

if TYPE_CHECKING:  # annotations only: the part registries (parts.py) stay free of diffusers
    from pipeline.models.restorer import Restorer


@dataclass
class Rollouts:
    lq: torch.Tensor  # (N, 3, H, W), each LQ repeated G times (N = n_images * G)
    gt: torch.Tensor
    tasks: list[str] | None
    group_size: int
    timesteps: list[int]
    stds: list[float]
    mask: torch.Tensor  # (S,) 1 for stochastic steps
    latents: torch.Tensor  # (S + 1, N, 3, H, W): x_T ... x_0
    log_probs: torch.Tensor  # (S, N) at sampling time
    x0: torch.Tensor  # (S, N, 3, H, W) predicted clean images per step
    images: torch.Tensor  # (N, 3, H, W) final restorations

    @property
    def n_groups(self) -> int:
        return self.lq.shape[0] // self.group_size


def collect(model: Restorer, lq: torch.Tensor, gt: torch.Tensor, tasks: list[str] | None,
            group_size: int, steps: int, eta: float, generator: torch.Generator,
            shard: tuple[int, int] = (0, 1)) -> Rollouts:
    """Sample `group_size` restorations of each LQ image (same LQ, different noise).

    `shard` (rank, world): `lq` holds rank's share of a global batch of world times as many
    images (pipeline/rl/sharding.py); the noise is drawn for the whole global batch, the same
    draws on every rank and in one process, and this shard's rows kept."""
    if eta <= 0:
        raise ValueError("RL needs eta > 0: with eta = 0 DDIM is deterministic and has no policy")
    lq_g, gt_g = lq.repeat_interleave(group_size, 0), gt.repeat_interleave(group_size, 0)
    tasks_g = [t for t in tasks for _ in range(group_size)] if tasks else None
    with torch.no_grad():
        out = model.sample(lq_g, steps, eta, generator, keep_trajectory=True, tasks=tasks_g, shard=shard)
    stds = [s.std for s in out.steps]
    log_probs = torch.stack([gaussian_log_prob(out.latents[i + 1], s.mean, s.std) for i, s in enumerate(out.steps)])
    return Rollouts(lq_g, gt_g, tasks_g, group_size, out.timesteps, stds, step_mask(stds),
                    torch.stack(out.latents), log_probs, torch.stack([s.x0 for s in out.steps]), out.image)


def step_log_prob(model: Restorer, r: Rollouts, step: int, idx: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of recorded transition `step` for samples `idx` under the current weights,
    and the step's mean (for the KL to the reference)."""
    model.timesteps(len(r.timesteps))
    tasks = [r.tasks[i] for i in idx.tolist()] if r.tasks else None
    out = model.step(r.latents[step][idx], r.timesteps[step], r.lq[idx], eta, tasks)
    return gaussian_log_prob(r.latents[step + 1][idx], out.mean, out.std), out.mean


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample clipped surrogate (to minimise) and whether the ratio was clipped."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (ratio - 1).abs() > clip
