"""Held-out images cut into patches and degraded in memory exactly as `prepare` does it for the
splits (patch size, lq_scale, tasks stratified by weight, seeded per image): benchmark folders a
user names in `evaluate.benchmarks` (or their ready pairs), and the `judge` stage's source images."""

from __future__ import annotations

import torch

from pipeline.config import BenchmarkConfig, PrepareConfig, SourceConfig
from pipeline.data.dataset import PairedSplit, to_tensor
from pipeline.data.patches import cut_patches, seeded_rng, split_tasks
from pipeline.data.sources import DataError, SourceImage, load_folder, load_pairs, load_skimage, local_source


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
    return cut_split(images, bench.patches_per_image, prepare, seed, ("benchmark", name), (bench.path, key),
                     task=bench.task if paired else None)


def load_hq_images(source: SourceConfig, key: str, endpoint: str | None = None) -> list[SourceImage]:
    """The HQ images of a skimage or folder `source` (the params `key` names it in errors)."""
    if source.kind == "skimage":
        return load_skimage(source.images, f"{key}.images")
    if source.kind != "folder":
        raise DataError(f"{key}.kind: '{source.kind}'; HQ images come from skimage or a folder")
    try:
        with local_source(source.path, endpoint) as folder:
            return load_folder(folder)
    except DataError as err:  # name the params key beside the path or URI
        raise DataError(f"{key}.path: {err}") from None


def cut_split(images: list[SourceImage], per_image: int, prepare: PrepareConfig, seed: int, keys: tuple[str, ...],
              where: tuple[str, str], task: str | None = None) -> PairedSplit:
    """`per_image` patches of each image as a split (no crop flatter than `prepare.min_patch_std`):
    ready pairs cut as they are (tasks: `task`, else "pairs"), HQ images degraded with
    `prepare.degradations`, the tasks stratified by
    weight; the draws seeded by `seed` and `keys` (per image and for the tasks). `where`: the
    images' folder and the params key naming it, for errors."""
    size, (folder, key) = prepare.patch_size, where
    for im in images:
        if min(im.gt.shape[:2]) < size:
            raise DataError(f"{folder}/{im.name} ({key}): {im.gt.shape[1]}x{im.gt.shape[0]} is smaller than "
                            f"prepare.patch_size={size}")
    paired = any(im.lq is not None for im in images)
    weights = {n: t.weight for n, t in prepare.degradations.tasks.items() if t.weight > 0}
    names = [im.name for im in images]
    tasks = {} if paired else split_tasks(names, per_image, weights, seeded_rng(seed, *keys, "tasks"))
    gts, lqs, samples = [], [], []
    for im in images:
        for patch in cut_patches(im, seeded_rng(seed, *keys, im.name), per_image, size, prepare.lq_scale,
                                 prepare.degradations, tasks.get(im.name), prepare.min_patch_std):
            samples.append({"id": f"{im.name}_{patch.index:04d}", "source": im.name, "task": task or patch.task,
                            "crop": list(patch.crop)})
            gts.append(patch.gt)
            lqs.append(patch.lq)
    return PairedSplit(torch.stack([to_tensor(g) for g in gts]), torch.stack([to_tensor(q) for q in lqs]),
                       samples)
