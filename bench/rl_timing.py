"""Where an RL epoch's time goes: rollout, reward, update, against a bare UNet forward+backward.

    python bench/rl_timing.py [--repeats 3]

Run in a workspace after `restorl repro` (it needs checkpoints/sft, checkpoints/reward and
data/difficulty.csv). With `params.yaml`'s `rl` section, times one epoch's phases of the rl
stage on the same code the stage runs (pipeline/rl/loop.py), median of `--repeats`:
  rollout  G rollouts of `images_per_epoch` LQ patches (`rl.steps` DDIM steps, no gradient)
  reward   the reward at every checkpoint of `rl.reward_steps`
  update   the training phase (objective, KL, regularizers, SFT loss, optimiser steps)
and the bare cost of the UNet: one forward+backward on a minibatch of `rl.minibatch`. The
ratio update / (bare fwd+bwd x the UNet passes the update makes) is the loop's overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data.dataset import load_split
from pipeline.models.loading import load_restorer
from pipeline.models.restorer import Restorer
from pipeline.paths import Paths
from pipeline.rewards.scorers import load_reward
from pipeline.rl import loop, parts
from pipeline.rl.rollout import collect


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params("params.yaml")
    cfg, paths = params.rl, Paths(Path("."))
    picked = parts.pick(cfg)
    torch.set_num_threads(params.runtime.threads)
    train = load_split(paths.data, "train")
    model = load_restorer(paths.sft_model)
    reference = model.reference() if picked.needs_reference else None
    reward = load_reward(params, paths, torch.device("cpu"))
    feedback = (load_reward(params, paths, torch.device("cpu"), differentiable=True)
                if picked.needs_differentiable_reward else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    idx = torch.arange(cfg.images_per_epoch)
    tasks = [train.tasks[i] for i in idx.tolist()]
    n = cfg.images_per_epoch * cfg.group_size
    w = torch.ones(n)

    phases: dict[str, list[float]] = {"rollout": [], "reward": [], "update": [], "bare": []}
    for _ in range(args.repeats):
        model.eval()
        r, seconds = timed(lambda: collect(model, train.lq[idx], train.gt[idx], tasks, cfg.group_size,
                                           cfg.steps, cfg.eta, generator))
        phases["rollout"].append(seconds)
        rewards, seconds = timed(lambda: loop.checkpoint_rewards(reward, r, cfg.reward_steps))
        phases["reward"].append(seconds)
        advantages = loop.per_step_advantages(rewards, r, picked, cfg) if picked.needs_advantages else None
        samples = loop.EpochSamples(idx, r, rewards, advantages, w, w)
        _, seconds = timed(lambda: loop.train_on_rollouts(model, optimizer, samples, picked, cfg, generator,
                                                          reference, feedback))
        phases["update"].append(seconds)
        phases["bare"].append(bare_forward_backward(model, r, cfg.minibatch))

    med = {k: statistics.median(v) for k, v in phases.items()}
    stochastic = int(r.mask.sum())
    steps_per_mb = max(1, round(cfg.train_step_fraction * stochastic))
    minibatches = cfg.inner_epochs * -(-n // cfg.minibatch)
    # Per minibatch: ppo trains `steps_per_mb` recorded steps (policy forward+backward, plus the
    # reference's forward for the KL), refl `refl.grad_steps` steps chained into the reward's
    # gradient; plus one forward+backward for the SFT loss.
    trained = steps_per_mb if picked.needs_advantages else cfg.refl.grad_steps
    passes = minibatches * (trained + 1)
    epoch = med["rollout"] + med["reward"] + med["update"]
    print(f"rl epoch: {cfg.images_per_epoch} images x G={cfg.group_size}, {cfg.steps} DDIM steps, "
          f"{minibatches} minibatches of {cfg.minibatch} x {trained} trained steps ({cfg.objective}) "
          f"(median of {args.repeats}, {params.runtime.threads} threads)")
    for name in ("rollout", "reward", "update"):
        print(f"  {name:8s} {med[name]:7.2f} s  {100 * med[name] / epoch:5.1f} %")
    print(f"  epoch    {epoch:7.2f} s")
    print(f"bare UNet forward+backward, minibatch {cfg.minibatch}: {1000 * med['bare']:.1f} ms; "
          f"the update makes ~{passes} such passes (+ reference forwards): "
          f"update / (passes x bare) = {med['update'] / (passes * med['bare']):.2f}")


def bare_forward_backward(model: Restorer, r, minibatch: int) -> float:
    """One UNet forward+backward on a recorded step's inputs, the unit the update is built of."""
    mb = torch.arange(min(minibatch, r.lq.shape[0]))
    tasks = [r.tasks[i] for i in mb.tolist()] if r.tasks else None

    def forward_backward():
        model.predict(r.latents[0][mb], r.timesteps[0], r.lq[mb], tasks).mean().backward()

    forward_backward()  # warm-up
    _, seconds = timed(forward_backward)
    model.unet.zero_grad(set_to_none=True)
    return seconds


if __name__ == "__main__":
    main()
