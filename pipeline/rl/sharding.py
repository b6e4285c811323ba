"""RL on many processes: what the `rl` stage adds to pipeline/distributed.py (docs/distributed.md).

Rollout groups are sharded: every rank draws the epoch's images and the rollouts' noise for all
of them from the same seeded generator, and samples the groups of its own images (a group
never spans ranks). Rewards and difficulties are gathered, so advantages, difficulty statistics
and logs see every group on every rank, and so are the rollouts, so that each rank can take its
equal share of every minibatch of the update. With one process every function here returns its
input: nothing is copied or communicated.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

from pipeline import distributed
from pipeline.rl.rollout import Rollouts

T = TypeVar("T")


def shard() -> tuple[int, int]:
    """(rank, world size): the `shard` argument of `collect` and `Restorer.sft_loss`."""
    return distributed.rank(), distributed.world_size()


def gather(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's `t` concatenated along `dim` in rank order (the same on every rank)."""
    if distributed.world_size() == 1:
        return t
    import torch.distributed as dist

    # nccl gathers CUDA tensors only (rewards and difficulties live on the CPU)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    parts = [torch.empty_like(t, device=on) for _ in range(distributed.world_size())]
    dist.all_gather(parts, t.to(on).contiguous())
    return torch.cat(parts, dim=dim).to(t.device)


def broadcast_object(obj: T) -> T:
    """The main process's `obj` (any picklable value) on every rank."""
    if distributed.world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# The dimension along which each batched field of `Rollouts` holds the rollouts.
_ROLLOUT_DIM = {"lq": 0, "gt": 0, "latents": 1, "log_probs": 1, "x0": 1, "images": 0}


def gather_rollouts(r: Rollouts, tasks: list[str] | None) -> Rollouts:
    """All ranks' rollouts in global order (this rank's `r` with one process). `tasks`: the
    global rollouts' tasks, which every rank knows from the images it drew."""
    if distributed.world_size() == 1:
        return r
    fields = {name: gather(getattr(r, name), dim) for name, dim in _ROLLOUT_DIM.items()}
    return dataclasses.replace(r, tasks=tasks, **fields)


def mine(minibatch: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a global minibatch (its whole with one process)."""
    return minibatch[distributed.rows(len(minibatch) // distributed.world_size())]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the ranks (the dict itself with one process)."""
    if distributed.world_size() == 1:
        return values
    means = gather(torch.tensor([list(values.values())], dtype=torch.float64)).mean(dim=0)
    return dict(zip(values, means.tolist()))
