"""Restore a split: the one function every stage uses to turn LQ patches into outputs.

`evaluate`, `rl` validation, `promote` and the reward model's training pairs all restore the
same way: DDIM with `evaluate.sampling` (steps, eta, mean of `samples` samples), in batches of
`evaluate.batch_size`, seeded — so the model that is validated is restored exactly as the one
that is evaluated and promoted.

Each batch draws its noise from a generator of its own (pipeline/seeding.py: the
restoration's seed and the batch's index), so the batches of a restoration can be streamed, or
shared among processes, and give the same images as one process restoring them in order.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import Params, SamplingConfig
from pipeline.data.dataset import PairedSplit
from pipeline.models.restorer import Restorer
from pipeline.seeding import Seed, batch_generator


def restore_batch(model: Restorer, lq: torch.Tensor, tasks: list[str], sampling: SamplingConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """The restorations of one batch of LQ patches, on the CPU."""
    with torch.no_grad():
        return model.restore(lq.to(model.device), sampling.steps, sampling.eta, generator, tasks=tasks,
                             samples=sampling.samples).cpu()


def restore(model: Restorer, data: PairedSplit, sampling: SamplingConfig, batch_size: int, seed: Seed,
            progress: bool = False, shared: bool = False) -> torch.Tensor:
    """(N, 3, H, W) restorations of every LQ patch of `data`, on the CPU; batch i's noise from
    `batch_generator(seed, i)` (a CPU generator, so results do not depend on the device).

    `shared`: under a launcher, every process calls this; the batches are shared among them
    (`distributed.spread`) and every process gets the whole result, equal to one process's."""
    model.eval()
    starts = list(range(0, len(data), batch_size))

    def job(i: int, start: int):
        end = start + batch_size
        return lambda: restore_batch(model, data.lq[start:end], data.tasks[start:end], sampling,
                                     batch_generator(seed, i))

    jobs = {i: job(i, start) for i, start in enumerate(starts)}
    bar = tqdm(total=len(jobs), desc="restore", unit="batch", disable=not (progress and distributed.is_main()))

    def counted(fn):
        def run():
            out = fn()
            bar.update(1)
            return out
        return run

    jobs = {i: counted(fn) for i, fn in jobs.items()}
    done = distributed.spread(jobs, everyone=True) if shared else {i: fn() for i, fn in jobs.items()}
    bar.close()
    return torch.cat([done[i] for i in jobs])


def restore_split(model: Restorer, data: PairedSplit, params: Params, progress: bool = False) -> torch.Tensor:
    """`restore` as `evaluate` scores: `evaluate.sampling`, seeded with `runtime.seed`."""
    return restore(model, data, params.evaluate.sampling, params.evaluate.batch_size, params.runtime.seed, progress)
