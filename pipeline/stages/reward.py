"""`reward`: train restorl's no-reference IQA reward model on its own data.

Pairs (better, worse) from the training split, Bradley-Terry loss -log sigmoid(s_b - s_w):
GT over LQ, GT over the SFT output, the SFT output over LQ where it is closer to GT (PSNR), and
each image over its hacked copies (dither, unsharp, blur, contrast) as hard negatives, so the
reward cannot be gamed by the edits the controls test. The checks the issue sets are computed
on the held-out val split and written to metrics/reward.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.device import setup_runtime
from pipeline.models.restorer import DiffusionRestorer
from pipeline.models.reward_model import RewardModel
from pipeline.paths import Paths
from pipeline.rewards.hacks import HACKS

SECTIONS = ["reward"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.reward, Paths(root)
    device = setup_runtime(params.runtime)
    sft = DiffusionRestorer.from_pretrained(paths.sft_model).to(device).eval()
    train, val = load_split(paths.data, "train"), load_split(paths.data, "val")
    generator = torch.Generator().manual_seed(params.runtime.seed)
    subset = torch.randperm(len(train), generator=generator)[: cfg.sft_samples]
    train = PairedSplit(train.gt[subset], train.lq[subset], [train.samples[i] for i in subset.tolist()])
    train_sft = restore(sft, train, params, generator)
    val_sft = restore(sft, val, params, generator)

    model = RewardModel(cfg.kernels, cfg.hidden).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    with tracking.stage_run("reward", params, SECTIONS, root):
        for step in tqdm(range(cfg.steps), desc="reward", unit="step"):
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=generator)
            better, worse = ranking_pairs(train.gt[idx], train.lq[idx], train_sft[idx], generator)
            loss = -F.logsigmoid(model(better.to(device)) - model(worse.to(device))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % 20 == 0:
                mlflow.log_metric("bt_loss", loss.item(), step=step + 1)
        model.eval()
        checks = reward_checks(model, val, val_sft, generator)
        mlflow.log_metrics({k: float(v) for k, v in tracking.flatten(checks).items() if not isinstance(v, bool)})
        with atomic_dir(paths.reward_model) as tmp:
            model.save(tmp)
        with atomic_file(paths.metrics / "reward.json") as tmp:
            tmp.write_text(json.dumps(checks, indent=2))
        mlflow.log_artifact(str(paths.metrics / "reward.json"))
    print(json.dumps(checks, indent=2))
    return checks


def restore(model: DiffusionRestorer, data: PairedSplit, params: Params, generator: torch.Generator) -> torch.Tensor:
    s = params.evaluate.sampling
    with torch.no_grad():
        return torch.cat([model.sample(data.lq[i:i + 64].to(model.device), s.steps, s.eta, generator,
                                       tasks=data.tasks[i:i + 64]).image.cpu()
                          for i in range(0, len(data), 64)])


def _psnr(x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(((x - gt) ** 2).mean(dim=(1, 2, 3)) / 4 + 1e-12)


def ranking_pairs(gt, lq, restored, generator):
    """Stacked (better, worse) images: GT≻LQ, GT≻SFT, SFT≻LQ where SFT is closer, X≻hack(X)."""
    better, worse = [gt, gt], [lq, restored]
    closer = _psnr(restored, gt) > _psnr(lq, gt)
    better.append(restored[closer])
    worse.append(lq[closer])
    for hack in HACKS.values():
        for image in (gt, restored):
            better.append(image)
            worse.append(hack(image, generator))
    return torch.cat(better), torch.cat(worse)


def reward_checks(model: RewardModel, val: PairedSplit, val_sft: torch.Tensor, generator) -> dict:
    """The acceptance checks on held-out data: ranking rates and the hack controls' scores."""
    with torch.no_grad():
        gt, lq, sft = model(val.gt), model(val.lq), model(val_sft)
        hacks = {name: float(model(hack(val_sft, generator)).mean()) for name, hack in HACKS.items()}
    result = {
        "gt_above_lq": float((gt > lq).float().mean()),
        "gt_above_sft": float((gt > sft).float().mean()),
        "mean": {"gt": float(gt.mean()), "sft": float(sft.mean()), "lq": float(lq.mean())},
        "hack_mean": hacks,
    }
    result["passed"] = bool(result["gt_above_lq"] >= 0.95 and result["gt_above_sft"] >= 0.80
                            and all(v <= result["mean"]["sft"] for v in hacks.values()))
    return result
