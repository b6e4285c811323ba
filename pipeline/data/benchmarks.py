"""Benchmark folders: held-out images a user names in `evaluate.benchmarks`, cut into patches
and degraded in memory exactly as `prepare` does it for the splits (patch size, lq_scale, tasks
stratified by weight, seeded per benchmark and image), or taken as ready pairs."""

from __future__ import annotations

import torch

from pipeline.config import BenchmarkConfig, PrepareConfig
from pipeline.data.dataset import PairedSplit, to_tensor
from pipeline.data.patches import cut_patches, seeded_rng, split_tasks
from pipeline.data.sources import DataError, load_folder, load_pairs, local_source


def load_benchmark(name: str, bench: BenchmarkConfig, prepare: PrepareConfig, seed: int,
                   endpoint: str | None = None) -> PairedSplit:
    """The benchmark's patches as a split: a folder with gt/ and lq/ is read as pairs (tasks:
    `bench.task`, else "pairs"), any other folder as HQ images degraded with `prepare.degradations`."""
    key = f"evaluate.benchmarks.{name}"
    with local_source(bench.path, endpoint) as folder:
        paired = (folder / "gt").is_dir() and (folder / "lq").is_dir()
        images = load_pairs(folder) if paired else load_folder(folder)
    if bench.task and not paired:
        raise DataError(f"{key}.task: {bench.path} holds HQ images, which are degraded with every task of "
                        "prepare.degradations; a task name applies to ready pairs (gt/ and lq/) only")
    size = prepare.patch_size
    for im in images:
        if min(im.gt.shape[:2]) < size:
            raise DataError(f"{bench.path}/{im.name} ({key}): {im.gt.shape[1]}x{im.gt.shape[0]} is smaller than "
                            f"prepare.patch_size={size}")
    weights = {n: t.weight for n, t in prepare.degradations.tasks.items() if t.weight > 0}
    names = [im.name for im in images]
    tasks = {} if paired else split_tasks(names, bench.patches_per_image, weights,
                                          seeded_rng(seed, "benchmark", name, "tasks"))
    gts, lqs, samples = [], [], []
    for im in images:
        for patch in cut_patches(im, seeded_rng(seed, "benchmark", name, im.name), bench.patches_per_image, size,
                                 prepare.lq_scale, prepare.degradations, tasks.get(im.name)):
            task = bench.task if paired and bench.task else patch.task
            samples.append({"id": f"{im.name}_{patch.index:04d}", "source": im.name, "task": task,
                            "crop": list(patch.crop)})
            gts.append(patch.gt)
            lqs.append(patch.lq)
    return PairedSplit(torch.stack([to_tensor(g) for g in gts]), torch.stack([to_tensor(q) for q in lqs]),
                       samples)
