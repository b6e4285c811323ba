"""One RL epoch in its phases, as DDPO has them (kvablack/ddpo-pytorch): sampling, update,
validation; then the selection of the epoch that ships. The `rl` stage strings them together;
bench/rl_timing.py times them one by one.

  sampling   draw `images_per_epoch` scored training images (hard ones oversampled if asked),
             G rollouts each (DDIM, eta > 0), the reward of the predicted clean image at each
             checkpoint of `reward_steps`; when the objective needs them, group-normalised
             advantages per checkpoint turned into per-step advantages by `step_credit` and
             scaled by `step_weighting`; each image's difficulty is refreshed from its
             rollouts and sets its RL weight w (`difficulty.weighting`).
  update     `inner_epochs` passes over minibatches, per sample
             w * L_RL + (1 - w) * lambda_sft * L_SFT + beta * KL + regularizers.
  validation val reward and PSNR, restored as `evaluate` restores.
  selection  the epoch with the best val reward gain over SFT whose PSNR fell by at most
             `psnr_guard` dB, overall and on every task (epoch 0 is the SFT model itself).

On many processes (pipeline/rl/sharding.py) each rank samples the groups of its share of the
images, and everything after sampling sees the gathered, global rewards, difficulties and
rollouts; the update trains each rank on its equal share of every minibatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.checkpoint import ensure_finite
from pipeline.config import Params, RlConfig
from pipeline.data.dataset import PairedSplit
from pipeline.device import backward_and_step
from pipeline.models.restorer import Restorer
from pipeline.models.sampling import restore_split
from pipeline.rewards import iqa
from pipeline.rewards.scorers import Reward
from pipeline.rl import sharding
from pipeline.rl.advantages import group_advantages, zero_variance_share
from pipeline.rl.difficulty import DifficultyTracker, draw_images, mixed_loss
from pipeline.rl.difficulty_table import measure
from pipeline.rl.objectives import UpdateBatch
from pipeline.rl.parts import RlParts
from pipeline.rl.rollout import Rollouts, collect


@dataclass
class Pool:
    """The images RL draws from: the scored training patches and their current difficulties."""

    train: PairedSplit
    index: torch.Tensor  # rows of `train` that were scored
    difficulty: torch.Tensor  # one per scored row, refreshed by rollouts


@dataclass
class EpochSamples:
    """What the sampling phase hands to the update."""

    picked: torch.Tensor  # positions in the pool
    rollouts: Rollouts
    rewards: torch.Tensor  # (K, N): the reward at each checkpoint of rl.reward_steps
    advantages: torch.Tensor | None  # (S, N) per step; None when the objective takes none
    weights: torch.Tensor  # (N,) RL weight w of each rollout (its image's)
    image_weights: torch.Tensor  # (images,) the same, once per image


@dataclass
class UpdateLosses:
    """Means over the update's minibatches."""

    loss_rl: float
    loss_sft: float
    kl: float
    clip_frac: float  # share of PPO ratios that were clipped (0 for other objectives)
    loss_reg: float | None  # the regularizers' sum; None without regularizers

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Validation:
    reward: float
    psnr: float
    task_psnr: dict[str, float] = field(default_factory=dict)  # per degradation task
    judge: float | None = None  # mean score by the held-out judge (None: not scored)

    def as_dict(self) -> dict:
        return {"reward": self.reward, "psnr": self.psnr, "task_psnr": dict(self.task_psnr), "judge": self.judge}


# ---------------------------------------------------------------------------------------------
# sampling


def sample_epoch(model: Restorer, pool: Pool, reward: Reward, tracker: DifficultyTracker, parts: RlParts,
                 params: Params, generator: torch.Generator) -> EpochSamples:
    """Rollouts, their rewards and advantages, and the RL weights; refreshes the pool's and the
    tracker's difficulties from the rollouts."""
    cfg, device, train = params.rl, model.device, pool.train
    # The whole epoch's images on every rank; this rank samples the groups of its share of them.
    picked = draw_images(pool.difficulty, cfg.images_per_epoch, cfg.difficulty.oversample, generator)
    idx = pool.index[picked]
    own = idx[distributed.rows(len(idx) // distributed.world_size())]
    model.eval()
    local = collect(model, train.lq[own].to(device), train.gt[own].to(device), [train.tasks[i] for i in own.tolist()],
                    cfg.group_size, cfg.steps, cfg.eta, generator, sharding.shard())
    # Rewards and difficulties of every group, on every rank; then the rollouts for the update.
    rewards = sharding.gather(checkpoint_rewards(reward, local, cfg.reward_steps), dim=1)
    fresh = sharding.gather(measure(reward, local.images, local.gt, params.score.fidelity_weight)["difficulty"])
    r = sharding.gather_rollouts(local, [train.tasks[i] for i in idx.tolist() for _ in range(cfg.group_size)])
    advantages = per_step_advantages(rewards, r, parts, cfg) if parts.needs_advantages else None
    fresh = fresh.view(-1, cfg.group_size).mean(dim=1)
    w = parts.weighting.weights(tracker, fresh, cfg.difficulty.q_lo, cfg.difficulty.q_hi)
    tracker.update(fresh)
    pool.difficulty[picked] = fresh
    return EpochSamples(picked, r, rewards, advantages, w.repeat_interleave(cfg.group_size).to(device), w)


def checkpoint_rewards(reward: Reward, r: Rollouts, checkpoints: list[int]) -> torch.Tensor:
    """(K, N) rewards of the clean image predicted after k steps, for each checkpoint k."""
    steps = len(r.timesteps)
    with torch.no_grad():
        return torch.stack([reward(r.images if k == steps else r.x0[k].clamp(-1, 1), r.gt) for k in checkpoints]).cpu()


def per_step_advantages(rewards: torch.Tensor, r: Rollouts, parts: RlParts, cfg: RlConfig) -> torch.Tensor:
    """(S, N) advantages: each checkpoint's rewards normalised within their groups, spread over
    the steps by `step_credit`, then scaled by `step_weighting`."""
    adv_k = torch.stack([group_advantages(rw.view(-1, cfg.group_size), cfg.advantage_clip,
                                          std_scope=cfg.advantage_std).flatten() for rw in rewards])
    return parts.step_weighting(parts.step_credit(adv_k, r, cfg), r, cfg)


# ---------------------------------------------------------------------------------------------
# update


def train_on_rollouts(model: Restorer, optimizer: torch.optim.Optimizer, samples: EpochSamples,
                      parts: RlParts, cfg: RlConfig, generator: torch.Generator,
                      reference: Restorer | None = None, reward: Reward | None = None,
                      epoch: int = 1, resume_dir: Path | None = None,
                      scaler: torch.amp.GradScaler | None = None) -> UpdateLosses:
    """The update phase. `reference`: the frozen SFT model (when the parts need it); `reward`:
    the differentiable reward (when the objective needs it). A non-finite loss stops it before
    the step is taken (`epoch` and `resume_dir` go into that error). `scaler`: fp16 loss
    scaling (pipeline.device.grad_scaler); None trains in the precision the model runs in."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    r, w = samples.rollouts, samples.weights
    advantages = samples.advantages.to(r.lq.device) if samples.advantages is not None else None
    totals = {"loss_rl": 0.0, "loss_sft": 0.0, "kl": 0.0, "clip_frac": 0.0}
    if cfg.regularizers:
        totals["loss_reg"] = 0.0
    updates = 0
    model.train()
    for _ in range(cfg.inner_epochs):
        for global_mb in torch.randperm(r.lq.shape[0], generator=generator).split(cfg.minibatch):
            mb = sharding.mine(global_mb)  # this rank's equal share; the mean of the ranks' losses is the global one
            batch = UpdateBatch(r, mb, cfg, generator, advantages, reward, reference)
            terms = parts.objective.loss(model, batch)
            tasks = [r.tasks[i] for i in mb.tolist()] if r.tasks else None
            # With w = 1 for every sample the SFT term is multiplied by 0: do not pay for it.
            l_sft = model.sft_loss(r.gt[mb], r.lq[mb], generator, tasks=tasks, shard=sharding.shard()) \
                if parts.uses_sft else torch.zeros(len(mb))
            per_sample = mixed_loss(w[mb], terms.rl, l_sft.to(w.device), cfg.difficulty.lambda_sft) + cfg.kl_beta * terms.kl
            if cfg.regularizers:
                per_sample = per_sample + terms.regularizers
            loss = per_sample.mean()
            ensure_finite(distributed.mean(loss), "rl", f"the update of epoch {epoch}",
                          resume_dir or Path("checkpoints/resume/rl"))
            backward_and_step(loss, optimizer, model.trainable_parameters(), cfg.grad_clip, scaler,
                              distributed.average_gradients)
            step_values = {"loss_rl": _mean(terms.rl), "loss_sft": _mean(l_sft), "kl": _mean(terms.kl),
                           "clip_frac": terms.clip_frac, "loss_reg": _mean(terms.regularizers)}
            for key in totals:
                totals[key] += step_values[key]
            updates += 1
    means = sharding.mean_over_ranks({k: v / updates for k, v in totals.items()})
    return UpdateLosses(means["loss_rl"], means["loss_sft"], means["kl"], means["clip_frac"], means.get("loss_reg"))


def _mean(value: torch.Tensor | float) -> float:
    return float(value.detach().mean()) if torch.is_tensor(value) else float(value)


# ---------------------------------------------------------------------------------------------
# validation and selection


def validate(model: Restorer, reward: Reward, val: PairedSplit, params: Params,
             judge: Reward | None = None) -> Validation:
    """Mean reward and PSNR of the val restorations, PSNR per task, and the mean score by the
    held-out `judge` when given (deterministic: `evaluate.sampling`, fixed seed)."""
    restored = restore_split(model, val, params)
    with torch.no_grad():
        r = reward(restored.to(model.device), val.gt.to(model.device))
        judged = None if judge is None else round(float(judge(restored.to(model.device)).mean()), 6)
    psnr = iqa.score("psnr", restored, val.gt)
    tasks = val.tasks
    task_psnr = {t: round(float(psnr[[i for i, x in enumerate(tasks) if x == t]].mean()), 4)
                 for t in sorted(set(tasks))}
    return Validation(round(float(r.mean()), 6), round(float(psnr.mean()), 4), task_psnr, judged)


@dataclass
class Selection:
    """The epoch that ships so far (0: the SFT model)."""

    epoch: int
    gain: float  # val reward gain over SFT
    val: dict
    weights: dict[str, torch.Tensor]  # the trained tensors at that epoch (Restorer.trainable_state), on the CPU


def psnr_losses(result: Validation, baseline: dict) -> dict[str, float]:
    """dB of val PSNR lost against SFT: overall and per task."""
    losses = {"overall": baseline["psnr"] - result.psnr}
    base_tasks = baseline.get("task_psnr", {})
    return losses | {t: base_tasks[t] - v for t, v in result.task_psnr.items() if t in base_tasks}


def judge_drop(result: Validation, baseline: dict) -> float | None:
    """How far the held-out judge's mean val score fell below SFT's (None: not scored)."""
    if result.judge is None or baseline.get("judge") is None:
        return None
    return baseline["judge"] - result.judge


def select(best: Selection, epoch: int, result: Validation, baseline: Validation | dict, psnr_guard: float,
           model: Restorer, judge_guard: float | None = None) -> Selection:
    """`epoch` replaces `best` when its val reward gain is larger, its PSNR fell by at most
    `psnr_guard`, overall and on every task (a gain bought by one task's fidelity, the reward
    brightening low-light outputs, say, does not ship), and, with a `judge_guard`, the held-out
    judge's score fell by at most that much (a gain only the trained-on reward sees does not ship)."""
    base = baseline if isinstance(baseline, dict) else baseline.as_dict()
    gain = result.reward - base["reward"]
    if judge_guard is not None:
        drop = judge_drop(result, base)
        if drop is None:
            raise ValueError("a judge guard needs the held-out judge's val scores of the epoch and of SFT")
        if drop > judge_guard:
            return best
    if max(psnr_losses(result, base).values()) <= psnr_guard and gain > best.gain:
        return Selection(epoch, gain, result.as_dict(), model.trainable_state())
    return best


def evenly_spaced(data: PairedSplit, n: int) -> PairedSplit:
    """At most `n` samples spread over the split (which is ordered by source and task draw)."""
    if n >= len(data):
        return data
    idx = torch.linspace(0, len(data) - 1, n).round().long()
    return PairedSplit(data.gt[idx], data.lq[idx], [data.samples[i] for i in idx.tolist()])


# ---------------------------------------------------------------------------------------------
# what each epoch logs


def epoch_record(epoch: int, samples: EpochSamples, checkpoints: list[int], group_size: int, losses: UpdateLosses,
                 tracker: DifficultyTracker, val: Validation, baseline: dict[str, float],
                 kl_beta: float) -> dict[str, float]:
    """Everything logged per epoch (MLflow metrics and plots/rl_curves.csv)."""
    record: dict[str, float] = {"epoch": epoch}
    for k, rw in zip(checkpoints, samples.rewards):
        name = "final" if k == checkpoints[-1] else f"step{k}"
        record |= {f"reward.{name}.mean": float(rw.mean()), f"reward.{name}.std": float(rw.std())}
    q = torch.quantile(tracker.values, torch.tensor([0.1, 0.5, 0.9])).tolist()
    w = samples.image_weights
    record |= {"zero_variance_share": zero_variance_share(samples.rewards[-1].view(-1, group_size)),
               **losses.as_dict()}
    if samples.advantages is not None:
        # beta * KL's pull on the step mean relative to the policy gradient's push: about
        # beta * sqrt(2 KL) / mean|A| (both gradients scale with 1 / (sigma^2 * pixels)).
        mean_adv = float(samples.advantages.abs().mean())
        record["kl_pull"] = kl_beta * math.sqrt(2 * max(losses.kl, 0.0)) / max(mean_adv, 1e-8)
    record |= {
        "difficulty.q10": q[0], "difficulty.q50": q[1], "difficulty.q90": q[2],
        "weight_rl": float(w.mean()), "weight_sft": float(1 - w.mean()),
        "val_reward": val.reward, "val_psnr": val.psnr, "val_reward_gain": val.reward - baseline["reward"],
        "val_psnr_drop": baseline["psnr"] - val.psnr,
        "val_psnr_drop_worst_task": max(psnr_losses(val, baseline).values()),
    }
    if (drop := judge_drop(val, baseline)) is not None:
        record |= {"val_judge": val.judge, "val_judge_drop": drop}
    return record
