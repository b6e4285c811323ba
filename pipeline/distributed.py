"""One training run on many processes: what a stage needs to run under a launcher.

`torchrun --nproc_per_node N -m pipeline.cli sft` (or `accelerate launch --multi_gpu
--num_processes N -m pipeline.cli sft`, which starts torchrun) runs N copies of a stage with
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in their environment. Without them
(plain `restorl sft`) the world is one process and nothing here touches torch.distributed.

The rules every distributed stage follows (docs/distributed.md):
- every rank holds the same seeded generator and draws the *global* batch (indices,
  augmentation, noise) exactly as one process would, then keeps its own rows (`rows`);
- gradients are averaged over the ranks before clipping and the optimiser step
  (`average_gradients`), so every rank applies the one-process update and the weights stay equal;
- only the main process (rank 0) talks to MLflow and writes outputs and resume state; every
  rank reads the resume state.

torch is imported inside the functions: the CLI asks `is_main()` before any stage loads torch.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, TypeVar

from pipeline.config import ConfigError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Gradients are averaged in flat buckets of at most this many elements (bounded extra memory).
BUCKET_ELEMENTS = 2 ** 24


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """The process that logs to MLflow and writes outputs: rank 0 (the only one without a launcher)."""
    return rank() == 0


def per_rank_batch(global_batch: int, name: str) -> int:
    """Each rank's share of a global batch; a batch that does not split evenly is an error naming
    the param (checked before any process group starts)."""
    world = world_size()
    if global_batch % world:
        raise ConfigError(f"{name} is {global_batch}, the global batch of all {world} processes together; it must "
                          f"be a multiple of the number of processes ({world}): e.g. {world * max(1, global_batch // world)}")
    return global_batch // world


def rows(per_rank: int) -> slice:
    """This rank's rows of a global batch of `per_rank * world_size()` rows."""
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


@contextlib.contextmanager
def session(device: "torch.device") -> Iterator["torch.device"]:
    """Join the process group for the duration of a stage (gloo on the CPU, nccl on CUDA, where
    each rank takes the GPU of its LOCAL_RANK); yield the device this rank computes on. One
    process: yields `device` and does nothing else."""
    if world_size() == 1:
        yield device
        return
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
        device = torch.device("cuda", local_rank())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        dist.barrier()  # nobody leaves (and the launcher does not end) before the main process has written
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def spread(jobs: "dict[Hashable, Callable[[], T]]", everyone: bool = False) -> "dict[Hashable, T]":
    """Run each job on one rank (the i-th on rank i % world size, `mine`) and give the main
    process every result, in the jobs' order; the other ranks get {} (with `everyone`, every
    rank gets them all). One process runs them all. For work whose pieces are independent (each
    restoration batch seeds its own generator): the results are those of one process, bit for bit."""
    keys = list(jobs)
    return gather({key: jobs[key]() for key in mine(keys)}, keys, everyone)


def mine(keys: "list[Hashable]") -> "list[Hashable]":
    """This rank's share of a list of pieces of work: the i-th piece is rank i % world size's."""
    return [key for i, key in enumerate(keys) if i % world_size() == rank()]


def gather(results: "dict[Hashable, T]", keys: "list[Hashable]", everyone: bool = False) -> "dict[Hashable, T]":
    """Every rank's `results` (each rank's `mine` of `keys`) for the main process, in the order
    of `keys`; {} for the other ranks, or all of them with `everyone`."""
    if world_size() == 1:
        return {key: results[key] for key in keys}
    import torch.distributed as dist

    parts: list | None = [None] * world_size() if is_main() or everyone else None
    if everyone:
        dist.all_gather_object(parts, results)
    else:
        dist.gather_object(results, parts, dst=0)
        if not is_main():
            return {}
    done = {key: value for part in parts for key, value in part.items()}
    return {key: done[key] for key in keys}


def mean(value: "torch.Tensor") -> "torch.Tensor":
    """The mean over the ranks of a tensor (a copy); the tensor itself with one process."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def broadcast_(tensors: "list[torch.Tensor]") -> None:
    """Overwrite every rank's `tensors` with the main process's (in place)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_gradients(params: "list[torch.nn.Parameter]") -> None:
    """Replace each gradient by its mean over the ranks (what DistributedDataParallel does,
    here after backward, in flat buckets). Every rank must hold gradients for the same
    parameters, as it does when all run the same code on the same global batch."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list = []
    for g in grads:
        if bucket and (sum(b.numel() for b in bucket) + g.numel() > BUCKET_ELEMENTS or g.dtype != bucket[0].dtype):
            _reduce_bucket(bucket)
            bucket = []
        bucket.append(g)
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: "list[torch.Tensor]") -> None:
    import torch
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
