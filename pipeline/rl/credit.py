"""Step credit: per-step advantages from the advantages at the reward checkpoints.

A rollout of S DDIM steps is scored at checkpoints k_1 < ... < k_K = S: the clean image
predicted after k steps (the final image at k = S), each reward normalised within its group
(pipeline/rl/advantages.py). A credit function turns those (K, N) checkpoint advantages into
the (S, N) advantages of the S transitions x_j -> x_{j+1}. The config picks one by name
(`rl.step_credit`); a method with its own credit adds a function here.

A step weighting (`rl.step_weighting`) then scales those per-step advantages by a factor
that depends on the step alone (LRPO's noise level); `uniform` leaves them as they are.

Every entry of both registries takes (advantages, rollouts, rl config) and reads its own
settings from the config (`rl.reward_steps`, `rl.coca`, `rl.noise_level`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.config import RlConfig
    from pipeline.rl.rollout import Rollouts


def next_checkpoint(adv: torch.Tensor, r: "Rollouts", cfg: "RlConfig") -> torch.Tensor:
    """Transition j first shows in the image predicted after j + 1 steps, so it takes the
    advantage of the first checkpoint k >= j + 1 of `rl.reward_steps` (the final image's for
    the last stretch)."""
    steps = len(r.timesteps)
    which = torch.searchsorted(torch.tensor(cfg.reward_steps), torch.arange(1, steps + 1))
    return adv[which]


def terminal(adv: torch.Tensor, r: "Rollouts", cfg: "RlConfig") -> torch.Tensor:
    """DDPO: every step gets the final image's advantage; other checkpoints are ignored."""
    return adv[-1:].expand(len(r.timesteps), -1)


# Cosine changes below this are rounding, not a step moving the image.
GAIN_FLOOR = 1e-6


def coca_step_weights(x0: torch.Tensor, final: torch.Tensor, window: int,
                      lq: torch.Tensor | None = None) -> torch.Tensor:
    """CoCA's (S, N) step weights, each column summing to 1, from how x0-hat approaches the final image.

    x0[k] is predicted from x_k, before transition k acts, so transition j (x_j -> x_{j+1})
    first shows in x0[j + 1] (the final image for the last one). The curve is
    c_k = cosine(x0[k], final image), k = 0..S-1, and c_S = 1 (the final image itself); with
    `lq` both sides are taken relative to it (x0-hat - LQ against final - LQ), so the LQ that
    every step shares does not put every cosine near 1. Transitions are cut into consecutive
    windows of `window` (the last may be shorter); a window's value is the mean of c_{j+1} over
    its transitions, its gain that value minus the previous window's (the first window's
    minus c_0). Negative gains (a window that moved away from the final image) count as 0.
    Each window's gain is shared equally by its transitions, and the weights are normalised to
    sum to 1 over the S steps.

    Definition for a trajectory without gains (every gain <= 0, e.g. an x0-hat that never
    changes): all weight on the last step, where the terminal reward is observed, as if
    only the outcome were known. Through the reward-to-go in `coca` every step then gets the
    trajectory's advantage unchanged: uniform credit, the DDPO case.
    """
    steps, n = x0.shape[:2]
    if lq is not None:
        x0, final = x0 - lq, final - lq
    curve = torch.cat([torch.nn.functional.cosine_similarity(x0.flatten(2), final.flatten(1)[None], dim=2),
                       torch.nn.functional.cosine_similarity(final.flatten(1), final.flatten(1), dim=1)[None]])
    window_of = torch.arange(steps) // window
    n_windows = int(window_of[-1]) + 1
    after = curve[1:]  # (S, N): c_{j+1}, where transition j first shows
    means = torch.stack([after[window_of == w].mean(dim=0) for w in range(n_windows)])  # (W, N)
    gains = means - torch.cat([curve[:1], means[:-1]])
    gains = torch.where(gains > GAIN_FLOOR, gains, torch.zeros_like(gains))  # rounding is no gain
    sizes = torch.bincount(window_of, minlength=n_windows).to(gains.dtype)
    per_step = (gains / sizes[:, None])[window_of]  # (S, N)
    total = per_step.sum(dim=0, keepdim=True)
    terminal_only = torch.zeros_like(per_step)
    terminal_only[-1] = 1.0
    return torch.where(total > 0, per_step / total.clamp(min=GAIN_FLOOR), terminal_only)


def coca(adv: torch.Tensor, r: "Rollouts", cfg: "RlConfig") -> torch.Tensor:
    """CoCA credit with the settings of `rl.coca` (coca_advantages)."""
    return coca_advantages(adv, r, cfg.coca.window, cfg.coca.clip, cfg.coca.relative_to_lq)


def coca_advantages(adv: torch.Tensor, r: "Rollouts", window: int = 2, clip: float = 5.0,
                    relative_to_lq: bool = True) -> torch.Tensor:
    """CoCA: the trajectory's (final image's) advantage A spread over steps by credit.

    With step weights w_k (coca_step_weights), step j's share is the reward-to-go
    rho_j = sum_{k >= j} w_k (a step is credited for everything after it that moved the
    image towards its final form); A_j = A * rho_j / mean(rho over the stochastic steps), so
    the mean per-step scale is 1 as in DDPO, then clipped to [-clip, clip]. Other reward
    checkpoints are ignored (use reward_steps: null).
    """
    lq = r.lq.double().cpu()
    if relative_to_lq and lq.shape[-2:] != r.images.shape[-2:]:  # an LQ at the latent's size
        lq = F.interpolate(lq, size=r.images.shape[-2:], mode="bicubic", align_corners=False)
    weights = coca_step_weights(r.x0.double().cpu(), r.images.double().cpu(), window,
                                lq if relative_to_lq else None).to(adv.dtype)
    to_go = weights.flip(0).cumsum(0).flip(0)
    stochastic = r.mask.bool()
    scale = to_go / to_go[stochastic].mean(dim=0, keepdim=True).clamp(min=1e-8)
    return (adv[-1:] * scale).clamp(-clip, clip)


STEP_CREDIT: dict[str, Callable[..., torch.Tensor]] = {
    "next_checkpoint": next_checkpoint,
    "terminal": terminal,
    "coca": coca,
}


def uniform(adv: torch.Tensor, r: "Rollouts", cfg: "RlConfig") -> torch.Tensor:
    """Every step keeps its advantage."""
    return adv


def noise_level(adv: torch.Tensor, r: "Rollouts", cfg: "RlConfig") -> torch.Tensor:
    """LRPO with `rl.noise_level` (noise_level_scaled)."""
    return noise_level_scaled(adv, r, cfg.noise_level.min_scale, cfg.noise_level.max_scale)


def noise_level_scaled(adv: torch.Tensor, r: "Rollouts", min_scale: float = 0.5, max_scale: float = 2.0) -> torch.Tensor:
    """LRPO: step j's advantage times clip(sigma_j / mean sigma, min_scale, max_scale), the mean
    over the stochastic steps. Noisier steps explore more, so their actions carry more of
    the outcome; deterministic steps (sigma 0, masked anyway) get min_scale."""
    stds = torch.tensor(r.stds, dtype=adv.dtype)
    stochastic = r.mask.bool()
    scale = (stds / stds[stochastic].mean()).clamp(min_scale, max_scale)
    return adv * scale[:, None]


STEP_WEIGHTING: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform,
    "noise_level": noise_level,
}
