"""Time one SFT step and DDIM sampling per image for the configured restorer.

    python bench/sft_speed.py [--params params.yaml] [--profile NAME] [--threads N]

Prints figures only (no pass/fail). Uses random tensors of the configured patch size, so it
needs no prepared data.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.config import load_params
from pipeline.device import setup_runtime
from pipeline.models.restorer import PixelRestorer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    params = load_params(args.params, args.profile)
    runtime = params.runtime.model_copy(update={"threads": args.threads or params.runtime.threads})
    device = setup_runtime(runtime)
    model = PixelRestorer.build(params.model).to(device)
    size, batch = params.prepare.patch_size, params.sft.batch_size
    gt = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    lq = gt + 0.1 * torch.randn_like(gt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.sft.lr)

    def sft_step():
        loss = model.sft_loss(gt, lq).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    steps, eta = params.evaluate.sampling.steps, params.evaluate.sampling.eta
    sample_batch = lq[: min(batch, 64)]

    def sample():
        with torch.no_grad():
            model.sample(sample_batch, steps, eta)

    n_params = sum(p.numel() for p in model.parameters())
    step_s = timed(sft_step, args.repeats)
    sample_s = timed(sample, max(1, args.repeats // 3))
    print(f"device={device} threads={runtime.threads} params={n_params:,} patch={size}px")
    print(f"sft step:  {step_s * 1e3:8.1f} ms / batch of {batch}  = {step_s / batch * 1e3:6.2f} ms per image")
    print(f"sampling:  {sample_s * 1e3:8.1f} ms / batch of {len(sample_batch)} ({steps} DDIM steps)"
          f"  = {sample_s / len(sample_batch) * 1e3:6.2f} ms per image")


if __name__ == "__main__":
    main()
