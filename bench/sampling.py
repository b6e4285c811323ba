"""PSNR gain of a trained restorer over the LQ input on the val split, per sampler setting.

    python bench/sampling.py [CHECKPOINT] [--steps 1 2] [--samples 1 4 8] [--split val]

Run in a workspace after `restorl repro` (CHECKPOINT defaults to checkpoints/sft). For each
number of deterministic DDIM steps and each number of averaged samples (different starting
noise, `evaluate.sampling.samples`), prints the mean gain in dB (restored - LQ), overall and
per task. The K-sample mean reuses the first K draws, so rows differ only in K. Settings are
chosen on val; `--split test` exists to report, not to choose.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.data.dataset import load_split
from pipeline.models.loading import load_restorer
from pipeline.rewards.iqa import psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/sft")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", choices=["val", "test"], default="val")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_restorer(args.checkpoint).eval()
    test = load_split("data/prepared", args.split)
    base = psnr(test.lq, test.gt)
    tasks = sorted(set(test.tasks))
    masks = {t: torch.tensor([x == t for x in test.tasks]) for t in tasks}
    print("| DDIM steps | samples | overall | " + " | ".join(tasks) + " |")
    print("|---|---|---|" + "---|" * len(tasks))
    for steps in args.steps:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            draws = torch.stack([model.sample(test.lq, steps, 0.0, generator, tasks=test.tasks).image
                                 for _ in range(max(args.samples))])
        for k in args.samples:
            gain = psnr(draws[:k].mean(dim=0), test.gt) - base
            cells = " | ".join(f"{float(gain[masks[t]].mean()):+.2f}" for t in tasks)
            print(f"| {steps} | {k} | {float(gain.mean()):+.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
