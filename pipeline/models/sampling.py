"""Restore a split: the one function every stage uses to turn LQ patches into outputs.

`evaluate`, `rl` validation, `promote` and the reward model's training pairs all restore the
same way: DDIM with `evaluate.sampling` (steps, eta, mean of `samples` samples), in batches of
`evaluate.batch_size`, seeded — so the model that is validated is restored exactly as the one
that is evaluated and promoted.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.config import Params, SamplingConfig
from pipeline.data.dataset import PairedSplit
from pipeline.models.restorer import Restorer


def restore(model: Restorer, data: PairedSplit, sampling: SamplingConfig, batch_size: int,
            generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """(N, 3, H, W) restorations of every LQ patch of `data`, on the CPU; the noise comes from
    `generator` (a CPU generator, so results do not depend on the device)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(data), batch_size), desc="restore", unit="batch", disable=not progress):
            cond = data.lq[i:i + batch_size].to(model.device)
            out.append(model.restore(cond, sampling.steps, sampling.eta, generator, tasks=data.tasks[i:i + batch_size],
                                     samples=sampling.samples).cpu())
    return torch.cat(out)


def restore_split(model: Restorer, data: PairedSplit, params: Params, progress: bool = False) -> torch.Tensor:
    """`restore` as `evaluate` scores: `evaluate.sampling`, a generator seeded with `runtime.seed`."""
    generator = torch.Generator().manual_seed(params.runtime.seed)
    return restore(model, data, params.evaluate.sampling, params.evaluate.batch_size, generator, progress)
