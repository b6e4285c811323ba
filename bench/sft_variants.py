"""Compare SFT variants at a fixed step budget: PSNR gain over the LQ input on the val split.

    python bench/sft_variants.py STEPS '{"sft": {"loss": "mse"}}' ['{"model": {...}}' ...] [--split val]

Run in a workspace whose `data/prepared` exists (`restorl prepare`). Each argument after STEPS
is a params override (JSON, deep-merged over ./params.yaml); each variant trains from the
same seed for STEPS steps (the `sft` stage's loss, LR schedule and EMA), in process, without
MLflow, and prints the mean PSNR gain (restored - LQ, dB) on the val split (settings are
chosen there; `--split test` only to report), overall and per task, for 1, 2, 4 and 10
deterministic DDIM steps of one sample and for `evaluate.sampling` ("evaluate").
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pipeline.config import deep_merge, load_raw, validate
from pipeline.data.dataset import load_split, random_dihedral, sample_weights
from pipeline.models.restorer import PixelRestorer
from pipeline.models.sampling import restore_split
from pipeline.rewards.iqa import psnr

SAMPLING_STEPS = (1, 2, 4, 10)


def train_and_score(override: dict, steps: int, split: str) -> dict:
    params = validate(deep_merge(load_raw("params.yaml"), override), "variant")
    torch.set_num_threads(params.runtime.threads)
    torch.manual_seed(params.runtime.seed)
    train, test = load_split("data/prepared", "train"), load_split("data/prepared", split)
    model = PixelRestorer.build(params.model, train.tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.sft.lr)
    schedule = get_scheduler(params.sft.lr_schedule, optimizer, num_warmup_steps=params.sft.warmup_steps,
                             num_training_steps=steps)
    ema = EMAModel(model.unet.parameters(), decay=params.sft.ema_decay or 0.0)
    generator = torch.Generator().manual_seed(params.runtime.seed)
    weights = sample_weights(params.sft.loss, train)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (params.sft.batch_size,), generator=generator)
        gt, lq = random_dihedral(train.gt[idx], train.lq[idx], generator)
        loss = (model.sft_loss(gt, lq, generator, tasks=[train.tasks[i] for i in idx.tolist()])
                * weights[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.sft.grad_clip)
        optimizer.step()
        schedule.step()
        ema.step(model.unet.parameters())
    ema.copy_to(model.unet.parameters())
    model.eval()
    tasks = np.array(test.tasks)
    base = psnr(test.lq, test.gt)
    gains = {}
    with torch.no_grad():
        for n in SAMPLING_STEPS:
            out = model.sample(test.lq, n, 0.0, torch.Generator().manual_seed(0), tasks=test.tasks).image
            gains[n] = psnr(out, test.gt) - base
    gains["evaluate"] = psnr(restore_split(model, test, params), test.gt) - base
    return {"variant": override, "steps": steps, "split": split, "seconds": round(time.perf_counter() - t0),
            "gain_db": {n: round(float(g.mean()), 2) for n, g in gains.items()},
            "per_task_gain_db": {n: {t: round(float(g[torch.from_numpy(tasks == t)].mean()), 2)
                                     for t in sorted(set(tasks))} for n, g in gains.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", type=int)
    ap.add_argument("overrides", nargs="+", help="JSON params overrides, one variant each ('{}': params.yaml)")
    ap.add_argument("--split", choices=["val", "test"], default="val")
    args = ap.parse_args()
    for arg in args.overrides:
        print(json.dumps(train_and_score(json.loads(arg), args.steps, args.split)), flush=True)


if __name__ == "__main__":
    main()
