"""Patches of source images and their seeded degraded twins: the crop positions, the task of
each patch (stratified by weight), its degradation chain. `prepare` writes them as files;
`evaluate` cuts benchmark folders the same way in memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import DegradationConfig
from pipeline.data.degradations import DEGRADATIONS, degrade
from pipeline.data.sources import SourceImage


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def task_counts(total: int, weights: dict[str, float], rng: np.random.Generator) -> dict[str, int]:
    """`total` patches shared among the tasks in proportion to their weights (largest
    remainder, ties broken by `rng`), every task at least one patch when there are as many
    patches as tasks."""
    names = sorted(weights)
    share = np.array([weights[n] for n in names], dtype=np.float64)
    exact = share / share.sum() * total
    counts = np.floor(exact).astype(int)
    if total >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() > total:  # the minimum of one is taken from the tasks most above their share
        counts[int(np.argmax(np.where(counts > 1, counts - exact, -np.inf)))] -= 1
    tie_break = rng.permutation(len(names))
    for i in np.lexsort((tie_break, -(exact - counts)))[:total - counts.sum()]:
        counts[i] += 1
    return {n: int(c) for n, c in zip(names, counts)}


def split_tasks(names: list[str], per_image: int, weights: dict[str, float],
                rng: np.random.Generator) -> dict[str, list[str]]:
    """The primary task of each of `per_image` patches of each image in `names`: the
    `len(names) * per_image` patches shared among the tasks by weight (`task_counts`), shuffled."""
    counts = task_counts(len(names) * per_image, weights, rng)
    order = [t for t, c in counts.items() for _ in range(c)]
    rng.shuffle(order)
    return {n: order[i * per_image:(i + 1) * per_image] for i, n in enumerate(names)}


def draw_chain(cfg: DegradationConfig, rng: np.random.Generator, first: str) -> list[tuple[str, dict]]:
    """The primary task `first`; with prob. mix_prob a second, different task after it."""
    tasks = {n: t for n, t in cfg.tasks.items() if t.weight > 0}
    names = sorted(tasks)
    chain = [first]
    others = [n for n in names if n != first]
    if others and rng.random() < cfg.mix_prob:
        chain.append(others[rng.integers(len(others))])
    return [(n, DEGRADATIONS[n].draw_params(tasks[n].params, rng)) for n in chain]


FLAT_TRIES = 50  # crop positions drawn before the most textured of them is kept


def crop_position(shape: tuple[int, int], size: int, rng: np.random.Generator, grey: np.ndarray | None,
                  min_std: float) -> tuple[int, int]:
    """A random top-left corner of a `size` crop. A crop whose grey level (`grey`, 0..1) has a
    standard deviation below `min_std` is drawn again: a flat crop teaches the restorer nothing,
    and its degraded twin is so close to it (often above 50 dB) that no quality model can rank
    the two. After FLAT_TRIES flat draws, the most textured of them is kept (an image may be
    flat). `min_std` 0 draws once per crop."""
    h, w = shape
    best, best_std = (0, 0), -1.0
    for _ in range(FLAT_TRIES):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if grey is None:
            return y, x
        std = float(grey[y:y + size, x:x + size].std())
        if std >= min_std:
            return y, x
        if std > best_std:
            best, best_std = (y, x), std
    return best


def area_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (H / factor, W / factor, 3): the mean of each factor x factor block."""
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64)
    return (blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


@dataclass
class Patch:
    index: int
    crop: tuple[int, int]  # (y, x) of the top-left corner
    gt: np.ndarray  # uint8 (P, P, 3)
    lq: np.ndarray  # uint8 (P / lq_scale, P / lq_scale, 3)
    task: str
    chain: list[tuple[str, dict]]  # the degradations applied, in order (empty for ready pairs)


def cut_patches(image: SourceImage, rng: np.random.Generator, count: int, size: int, lq_scale: int,
                degradations: DegradationConfig, tasks: list[str] | None = None,
                min_std: float = 0.0) -> Iterator[Patch]:
    """`count` random crops of `image` (`crop_position`: none flatter than `min_std`) with their
    LQ: the pair's own LQ, or the crop degraded with the chain `draw_chain` draws for
    `tasks[k]`; block-mean downscaled by `lq_scale`."""
    grey = image.gt.mean(axis=2) / 255.0 if min_std > 0 else None
    for k in range(count):
        y, x = crop_position(image.gt.shape[:2], size, rng, grey, min_std)
        gt = image.gt[y:y + size, x:x + size]
        if image.lq is not None:
            lq, chain, task = image.lq[y:y + size, x:x + size], [], "pairs"
        else:
            chain = draw_chain(degradations, rng, tasks[k])
            lq, task = degrade(gt / 255.0, chain, rng), chain[0][0]
        if lq_scale > 1:
            lq = area_downscale(lq, lq_scale)
        yield Patch(k, (y, x), gt, lq, task, chain)
