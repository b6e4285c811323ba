"""Training a no-reference reward model (pipeline/models/reward_model.py) from ranked pairs: the
loop the `reward` stage trains restorl's reward with and the `judge` stage its held-out judge.

Every step scores, for a batch of patches, the GT, its LQ, the SFT output, fresh degraded copies
of the GT and each hack control applied to the SFT output, once each (one random dihedral
transform and colour-channel permutation for the whole batch), and applies the Bradley-Terry
ranking loss -log sigmoid(s_better - s_worse) (as in RankIQA: Liu et al., "RankIQA: Learning
from Rankings for No-reference Image Quality Assessment", 2017) to the pairs

- quality: GT over LQ, GT over the SFT output, the SFT output over LQ where it is closer to GT
  (PSNR), GT over each fresh copy;
- hacks: the SFT output over each of its hacked copies (dither, unsharp, blur, contrast), so the
  reward cannot be gamed by the edits the controls test (weighted by `hack_weight`);
- detail (with `detail_weight` > 0): GT over GT plus the high-pass of the SFT output's error,
  and the SFT output less that high-pass over the SFT output. The error's fine part (residual
  noise and streaks, lost edges) then costs score at either image's own brightness, so a model
  cannot rank by brightness alone where SFT is also darker than GT (low light).

The fresh copies are drawn once per run from every degradation family at its default ranges
(pipeline/data/degradations.py): more negatives than the fixed pairs. The acceptance checks
(`reward_checks`: GT above LQ, GT above the SFT output, every hack control below SFT) are
measured on held-out patches.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from pipeline import distributed
from pipeline.checkpoint import ensure_finite
from pipeline.config import RewardConfig
from pipeline.data.dataset import PairedSplit
from pipeline.data.degradations import DEGRADATIONS, degrade
from pipeline.models.reward_model import RewardModel, high_pass
from pipeline.rewards.checks import failures
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.iqa import psnr


def train_reward_model(cfg: RewardConfig, train: PairedSplit, train_sft: torch.Tensor, fresh: list[torch.Tensor],
                       generator: torch.Generator, device: torch.device, per_rank: int, name: str,
                       resume: Path) -> RewardModel:
    """A RewardModel (`cfg`'s size) trained for `cfg.steps` on batches of `train` (with its SFT
    outputs `train_sft` and `fresh` degraded copies) drawn by `generator`; its initial weights
    come from torch's global generator. Under a launcher every process calls this and scores its
    `per_rank` rows of each global batch; the main process logs the losses to the active MLflow
    run. `name` labels the progress bar and a non-finite loss (its state would lie in `resume`)."""
    main, mine = distributed.is_main(), distributed.rows(per_rank)
    train_lq = train.lq_full  # the LQ negatives at the GT's size
    model = RewardModel(cfg.kernels, cfg.hidden, cfg.blocks).to(device).train()
    distributed.broadcast_(list(model.parameters()))  # every rank starts from the main process's weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    # Linear warm-up over the first 10% of steps, then cosine decay to 0 (as the sft stage).
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, cfg.steps // 10),
                             num_training_steps=cfg.steps)
    for step in tqdm(range(cfg.steps), desc=name, unit="step", disable=not main):
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=generator)
        images, *pairs = training_batch(train.gt[idx], train_lq[idx], train_sft[idx], [f[idx] for f in fresh],
                                        generator, detail=cfg.detail_weight > 0)
        quality_loss, hack_loss, *detail_loss = pair_losses(model, images.to(device), pairs, cfg.batch_size, mine)
        detail_loss = detail_loss[0] if detail_loss else torch.zeros((), device=device)
        loss = quality_loss + cfg.hack_weight * hack_loss + cfg.detail_weight * detail_loss
        global_loss = distributed.mean(loss.detach())  # the loss of the global batch
        ensure_finite(global_loss, name, f"step {step + 1}", resume)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(model.parameters()))
        optimizer.step()
        schedule.step()
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            names = ["bt_loss", "hack_loss"] + ["detail_loss"] * (cfg.detail_weight > 0)
            logged = distributed.mean(torch.stack([quality_loss, hack_loss, detail_loss][:len(names)]).detach())
            if main:
                mlflow.log_metrics({k: v.item() for k, v in zip(names, logged)}, step=step + 1)
    return model.eval()


def pair_losses(model: RewardModel, images: torch.Tensor, pairs: tuple[torch.Tensor, ...], batch_size: int,
                mine: slice) -> list[torch.Tensor]:
    """This process's share of each ranking loss, the mean of -log sigmoid(s_better - s_worse)
    over the `pairs` of the global batch (images stacked kind by kind, `batch_size` rows each).
    The process scores only the images of its `mine` rows (every kind; a pair never spans two
    rows) and returns world size x (its pairs' summed losses) / (all pairs): the mean over the
    processes is the one-process loss, and the averaged gradients are its gradient."""
    rows = torch.arange(len(images)) % batch_size
    kept = (rows >= mine.start) & (rows < mine.stop)
    scores = torch.zeros(len(images), device=images.device)
    scores = scores.index_put((kept.nonzero()[:, 0].to(images.device),), model.score_view(images[kept.to(images.device)]))
    world = distributed.world_size()
    losses = []
    for pair in pairs:
        own = pair[kept[pair[:, 0]]]
        losses.append(-F.logsigmoid(scores[own[:, 0]] - scores[own[:, 1]]).sum() * world / len(pair))
    return losses


def fresh_degradations(gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One new 8-bit degraded copy of each GT patch: a family drawn uniformly, its default ranges."""
    names = sorted(DEGRADATIONS)
    out = []
    for image in ((gt.permute(0, 2, 3, 1).numpy() + 1) / 2):
        family = DEGRADATIONS[names[rng.integers(len(names))]]
        out.append(degrade(image, [(family.name, family.draw_params({}, rng))], rng))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def training_batch(gt, lq, restored, fresh: list[torch.Tensor], generator, detail: bool = False):
    """Stacked images [GT, LQ, SFT, *fresh, *hack(SFT)] under one random dihedral transform and
    colour-channel permutation, and (better, worse) index pairs into them: quality pairs and hack
    pairs, each an (P, 2) tensor. With `detail`, also [GT + SFT's detail error, SFT less it] and
    the detail pairs."""
    k, flip = int(torch.randint(0, 4, (1,), generator=generator)), bool(torch.rand(1, generator=generator) < 0.5)
    channels = torch.randperm(3, generator=generator)  # colour permutation: more content variety
    natural = [torch.rot90(x[:, channels], k, (2, 3)) for x in (gt, lq, restored, *fresh)]
    if flip:
        natural = [x.flip(3) for x in natural]
    gt, lq, restored = natural[:3]
    images = natural + [hack(restored, generator) for hack in HACKS.values()]
    if detail:  # the fine part of SFT's error (residual noise and streaks, missing edges) moved
        error = high_pass(restored - gt)  # onto GT, and taken off SFT, its brightness and colour kept
        images += [(gt + error).clamp(-1, 1), (restored - error).clamp(-1, 1)]
    group = [torch.arange(len(gt)) + j * len(gt) for j in range(len(images))]  # indices per image kind
    closer = psnr(restored, gt) > psnr(lq, gt)
    quality = [(group[0], group[1]), (group[0], group[2]), (group[2][closer], group[1][closer])]
    quality += [(group[0], group[3 + j]) for j in range(len(fresh))]
    hacks = [(group[2], group[3 + len(fresh) + j]) for j in range(len(HACKS))]
    pairs = [_stack_pairs(quality), _stack_pairs(hacks)]
    if detail:
        pairs.append(_stack_pairs([(group[0], group[-2]), (group[-1], group[2])]))
    return torch.cat(images), *pairs


def _stack_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([b for b, _ in pairs]), torch.cat([w for _, w in pairs])], 1)


def reward_checks(model: RewardModel, held_out: PairedSplit, held_out_sft: torch.Tensor, generator) -> dict:
    """The acceptance checks on held-out data: ranking rates and the hack controls' scores."""
    with torch.no_grad():
        gt, lq, sft = model(held_out.gt), model(held_out.lq_full), model(held_out_sft)
        hacks = {name: float(model(hack(held_out_sft, generator)).mean()) for name, hack in HACKS.items()}
    result = {
        "gt_above_lq": float((gt > lq).float().mean()),
        "gt_above_sft": float((gt > sft).float().mean()),
        "mean": {"gt": float(gt.mean()), "sft": float(sft.mean()), "lq": float(lq.mean())},
        "hack_mean": hacks,
    }
    result["passed"] = not failures(result)
    return result
