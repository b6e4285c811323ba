"""Extra per-sample loss terms of the RL update, picked by name in `rl.regularizers`.

Each one looks at a trained step of a minibatch (`TrainedStep`: the trained model's step
output with gradient, the frozen reference's from the same x_t) and returns a weighted
per-sample loss that the update adds next to w * L_RL + (1 - w) * lambda_sft * L_SFT + beta * KL.

- `gram` (RFSR, Sun et al.): keeps the texture statistics of the trained model's x0-hat
  close to the frozen reference's, against stylisation (reward hacking by texture).
- `gt_likelihood` (LRPO): pulls the last steps' Gaussian policy towards the step that
  leads to the ground truth.

Also here: `wavelet_ll_l1`, the low-frequency constraint of RFSR's early steps (used by the
`refl` objective, pipeline/rl/objectives.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # config validation imports this module; keep diffusers out of it
    from pipeline.config import RlConfig
    from pipeline.models.restorer import Restorer, StepOutput
    from pipeline.rl.rollout import Rollouts


@dataclass
class TrainedStep:
    """Recorded step `step` of the minibatch `idx`, as the update sees it."""

    r: Rollouts
    step: int
    idx: torch.Tensor
    out: StepOutput  # the trained model's step from x_step, with gradient
    ref: StepOutput | None  # the frozen reference's step from the same x_step

    @property
    def tasks(self) -> list[str] | None:
        return [self.r.tasks[i] for i in self.idx.tolist()] if self.r.tasks else None


# ---------------------------------------------------------------------------------------------
# the wavelet low-frequency loss


def wavelet_ll(images: torch.Tensor, wavelet: str = "haar", level: int = 1) -> torch.Tensor:
    """The LL (approximation) band of a `level`-level 2-D DWT, per channel: (N, C, H', W').

    ptwt's transform is differentiable, so gradients reach the image."""
    import ptwt

    return ptwt.wavedec2(images, wavelet, level=level)[0]


def wavelet_ll_l1(images: torch.Tensor, target: torch.Tensor, wavelet: str = "haar", level: int = 1) -> torch.Tensor:
    """Per-sample mean |LL(images) - LL(target)|: RFSR's early-step constraint, which fixes the
    coarse structure and leaves the high frequencies (noise level still high) alone."""
    diff = wavelet_ll(images, wavelet, level) - wavelet_ll(target.detach(), wavelet, level)
    return diff.abs().mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# gram


def gram_matrices(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, C) channel correlations F F^T / (C H W) (Gatys et al.'s style)."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def gram_distance(features: list[torch.Tensor], ref_features: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample sum over layers of the mean squared difference of the Gram matrices."""
    return sum(((gram_matrices(f) - gram_matrices(g.detach())) ** 2).mean(dim=(1, 2))
               for f, g in zip(features, ref_features))


def gram(ts: TrainedStep, model: Restorer, reference: Restorer, cfg: RlConfig) -> torch.Tensor:
    """weight * Gram distance between the encoder features of the trained and the reference
    model's x0-hat at this step (both through the frozen reference's encoder:
    `Restorer.encoder_features`, conv_in and the first `gram.blocks` down blocks at t = 0).

    Why this network: no downloaded weights exist offline (no VGG), and of what is at hand
    the frozen SFT UNet's encoder is (1) independent of the reward being maximised, so a
    texture the reward model is blind to or likes is still seen (the learned reward's own
    conv layer would share its blind spots), (2) multi-scale, and (3) trained on exactly
    these images and degradations. The frozen reference is already in memory as the KL anchor.
    """
    lq = ts.r.lq[ts.idx]
    ours = reference.encoder_features(ts.out.x0, lq, ts.tasks, cfg.gram.blocks)
    with torch.no_grad():
        theirs = reference.encoder_features(ts.ref.x0, lq, ts.tasks, cfg.gram.blocks)
    return cfg.gram.weight * gram_distance(ours, theirs)


# ---------------------------------------------------------------------------------------------
# gt_likelihood


def gt_guided_mean(model: Restorer, x_t: torch.Tensor, t: int, gt: torch.Tensor, lq: torch.Tensor,
                   steps: int, eta: float) -> torch.Tensor:
    """x_{t-1}^GT: the DDIM step's mean had the model predicted the GT exactly.

    Goes through the same scheduler step as the policy (the model output that makes the GT
    its x0-hat), so a model that predicts the GT has exactly this mean."""
    scheduler = model.sample_scheduler
    model.timesteps(steps)
    x0 = model.signal(gt, lq)
    a_t = scheduler.alphas_cumprod[t].to(x_t)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    output = {"epsilon": eps, "sample": x0,
              "v_prediction": a_t.sqrt() * eps - (1 - a_t).sqrt() * x0}[scheduler.config.prediction_type]
    return scheduler.step(output, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample


def likelihood_penalty(log_prob: torch.Tensor, tau: float) -> torch.Tensor:
    """LRPO's 1 - exp(log p / tau): falls as the GT step grows likelier under the policy, and
    saturates at 1 for very unlikely ones (their gradient fades, so outliers do not dominate);
    tau sets the scale of log p where that happens."""
    return 1 - torch.exp(log_prob / tau)


def gt_likelihood(ts: TrainedStep, model: Restorer, reference: Restorer,
                  cfg: RlConfig) -> torch.Tensor:
    """weight * (1 - exp(log N(x_{t-1}^GT; mu_theta, sigma_t^2) / tau)) on the last
    `last_steps` stochastic steps (pixel-mean log-density, as the policy's); 0 elsewhere."""
    from pipeline.rl.policy import gaussian_log_prob

    r, s = ts.r, ts.step
    last = r.mask.nonzero().flatten()[-cfg.gt_likelihood.last_steps:].tolist()
    if s not in last:
        return torch.zeros(len(ts.idx), device=ts.out.mean.device)
    with torch.no_grad():
        target = gt_guided_mean(model, r.latents[s][ts.idx], r.timesteps[s], r.gt[ts.idx], r.lq[ts.idx],
                                len(r.timesteps), cfg.eta)
    log_prob = gaussian_log_prob(target, ts.out.mean, r.stds[s])
    return cfg.gt_likelihood.weight * likelihood_penalty(log_prob, cfg.gt_likelihood.tau)


@dataclass(frozen=True)
class Regularizer:
    loss: Callable[[TrainedStep, Restorer, Restorer, RlConfig], torch.Tensor]
    needs_reference: bool  # whether the update must run the frozen reference's step


REGULARIZERS: dict[str, Regularizer] = {
    "gram": Regularizer(gram, needs_reference=True),
    "gt_likelihood": Regularizer(gt_likelihood, needs_reference=False),
}
