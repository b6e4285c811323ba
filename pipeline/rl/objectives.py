"""What the update minimises on one minibatch of rollouts, picked by `rl.objective`.

Both objectives return per-sample terms that the one update (pipeline/rl/loop.py) mixes the
same way: w * L_RL + (1 - w) * lambda_sft * L_SFT + beta * KL + regularizers. Each declares
what it needs (`Objective`): per-step advantages, or a differentiable reward; the loop
computes only what the chosen parts ask for and hands it over in an `UpdateBatch`.

- `ppo` (DDPO, Black et al.): PPO's clipped ratio of the recomputed log-probs of a random
  share of the recorded stochastic transitions, with the per-step advantages.
- `refl` (ReFL, Xu et al.; DRaFT, Clark et al.; RFSR, Sun et al.): one step of the recorded
  trajectory, drawn from RFSR's early or late window, is re-run with gradient; its x0-hat
  gets, in the early window, the L1 between its wavelet LL band and the GT's and, in the
  late window, minus the differentiable reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.rl.policy import gaussian_kl, gaussian_log_prob
from pipeline.rl.regularizers import REGULARIZERS, TrainedStep, wavelet_ll_l1
from pipeline.rl.rollout import Rollouts, ppo_loss

if TYPE_CHECKING:
    from pipeline.config import RlConfig
    from pipeline.models.restorer import Restorer, StepOutput
    from pipeline.rewards.scorers import Reward


@dataclass
class UpdateBatch:
    """One minibatch of rollouts and what the chosen parts asked the loop for."""

    r: Rollouts
    idx: torch.Tensor  # the minibatch's rows of the rollouts
    cfg: RlConfig
    generator: torch.Generator
    advantages: torch.Tensor | None = None  # (S, N) per-step, for objectives that need them
    reward: Reward | None = None  # the differentiable reward, for objectives that need it
    reference: Restorer | None = None  # the frozen SFT model, for KL and regularizers


@dataclass
class MinibatchTerms:
    """Per-sample terms of one minibatch (0.0 where a term is off)."""

    rl: torch.Tensor | float
    kl: torch.Tensor | float
    regularizers: torch.Tensor | float
    clip_frac: float


def policy_step(model: Restorer, r: Rollouts, step: int, idx: torch.Tensor, eta: float,
                x_t: torch.Tensor | None = None) -> StepOutput:
    """Recorded step `step` for samples `idx` under the model's current weights (from the
    recorded x_step unless `x_t` is given)."""
    model.timesteps(len(r.timesteps))
    tasks = [r.tasks[i] for i in idx.tolist()] if r.tasks else None
    return model.step(r.latents[step][idx] if x_t is None else x_t, r.timesteps[step], r.lq[idx], eta, tasks)


def _reference_step(batch: UpdateBatch, step: int) -> StepOutput | None:
    """The frozen reference's step from the same x_t, when the parts asked for the reference."""
    if batch.reference is None:
        return None
    with torch.no_grad():
        return policy_step(batch.reference, batch.r, step, batch.idx, batch.cfg.eta)


def _regularizers(ts: TrainedStep, model: Restorer, batch: UpdateBatch) -> torch.Tensor | float:
    return sum((REGULARIZERS[name].loss(ts, model, batch.reference, batch.cfg) for name in batch.cfg.regularizers), 0.0)


def ppo(model: Restorer, batch: UpdateBatch) -> MinibatchTerms:
    """Clipped surrogate, KL and regularizers averaged over a seeded `train_step_fraction` of
    the stochastic steps (the same subset for the whole minibatch)."""
    r, mb, cfg = batch.r, batch.idx, batch.cfg
    stochastic = r.mask.nonzero().flatten()
    n_steps = max(1, round(cfg.train_step_fraction * len(stochastic)))
    steps = stochastic[torch.randperm(len(stochastic), generator=batch.generator)[:n_steps]].tolist()
    l_rl, kl, reg, clipped = 0.0, 0.0, 0.0, 0.0
    for s in steps:
        out = policy_step(model, r, s, mb, cfg.eta)
        log_prob = gaussian_log_prob(r.latents[s + 1][mb], out.mean, out.std)
        loss, was_clipped = ppo_loss(log_prob, r.log_probs[s, mb], batch.advantages[s, mb], cfg.ppo_clip)
        l_rl = l_rl + loss / n_steps
        clipped += float(was_clipped.float().mean()) / n_steps
        ref = _reference_step(batch, s)
        if cfg.kl_beta > 0:
            kl = kl + gaussian_kl(out.mean, ref.mean, r.stds[s]) / n_steps
        if cfg.regularizers:
            reg = reg + _regularizers(TrainedStep(r, s, mb, out, ref), model, batch) / n_steps
    return MinibatchTerms(l_rl, kl, reg, clipped)


def refl_windows(steps: int, early_until: float, late_from: float) -> tuple[list[int], list[int]]:
    """Step indices of RFSR's early and late windows: step j is at p = (j + 1) / steps of the
    schedule; early p <= early_until, late p > late_from (the last step always is late).
    On a 50-step schedule with 0.4 / 0.8: early 0-19, late 40-49, as in RFSR."""
    position = [(j + 1) / steps for j in range(steps)]
    early = [j for j, p in enumerate(position) if p <= early_until + 1e-9]
    late = [j for j, p in enumerate(position) if p > late_from + 1e-9]
    return early, late


def refl(model: Restorer, batch: UpdateBatch) -> MinibatchTerms:
    """Reward feedback on one seeded step s of the windows, for the whole minibatch.

    Gradient flows through `refl.grad_steps` steps ending at s, started from the recorded
    x at their first step; each intermediate x keeps its recorded value and passes the
    gradient of its mean (x = recorded + mean - mean.detach(): the recorded noise,
    reparameterised), so the chain stays on the sampled trajectory.
    """
    if batch.reward is None:
        raise ValueError("the refl objective needs a differentiable reward")
    r, mb, cfg = batch.r, batch.idx, batch.cfg
    settings = cfg.refl
    early, late = refl_windows(len(r.timesteps), settings.early_until, settings.late_from)
    candidates = early + late
    s = candidates[int(torch.randint(len(candidates), (1,), generator=batch.generator))]
    first = max(0, s - settings.grad_steps + 1)
    x = r.latents[first][mb]
    for j in range(first, s + 1):
        out = policy_step(model, r, j, mb, cfg.eta, x_t=x)
        if j < s:
            x = r.latents[j + 1][mb] + (out.mean - out.mean.detach())
    gt = r.gt[mb]
    if s in early:
        l_rl = settings.dwt_weight * wavelet_ll_l1(out.x0, gt, settings.wavelet, settings.dwt_level)
    else:
        l_rl = -settings.reward_weight * batch.reward(out.x0, gt)
    ref = _reference_step(batch, s)
    kl = gaussian_kl(out.mean, ref.mean, r.stds[s]) if cfg.kl_beta > 0 else 0.0
    reg = _regularizers(TrainedStep(r, s, mb, out, ref), model, batch) if cfg.regularizers else 0.0
    return MinibatchTerms(l_rl, kl, reg, 0.0)


@dataclass(frozen=True)
class Objective:
    """What the update minimises per sample, and what it needs from the loop."""

    loss: Callable[[Restorer, UpdateBatch], MinibatchTerms]
    needs_advantages: bool  # per-step advantages of the rollouts (policy-gradient objectives)
    needs_differentiable_reward: bool  # the reward with its gradient (reward feedback)


OBJECTIVES: dict[str, Objective] = {
    "ppo": Objective(ppo, needs_advantages=True, needs_differentiable_reward=False),
    "refl": Objective(refl, needs_advantages=False, needs_differentiable_reward=True),
}
