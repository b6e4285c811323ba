"""`prepare`: images -> HQ patches + seeded degraded LQ twins, split by source image.

Output (replaced whole, never partially): `data/prepared/{train,val,test}/{gt,lq}/*.png` and
`data/prepared/manifest.json` with each sample's task, source, degradation chain and hashes.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import tracking
from pipeline.atomic import atomic_dir
from pipeline.config import Params, PrepareConfig
from pipeline.data import degradations
from pipeline.data.degradations import DEGRADATIONS, degrade
from pipeline.data.sources import (
    DataError,
    SourceImage,
    load_faces,
    load_folder,
    load_pairs,
    load_skimage,
    local_source,
)
from pipeline.paths import Paths

SPLITS = ("train", "val", "test")


def run(params: Params, root: Path = Path(".")) -> dict:
    from pipeline.storage import endpoint_url

    cfg = params.prepare
    degradations.check(cfg.degradations)
    images = load_sources(cfg, endpoint_url(params.storage))
    splits = split_by_source([im.name for im in images], cfg, params.runtime.seed)
    paths = Paths(root)
    paired = images[0].lq is not None  # ready pairs carry no degradation task
    schedule = {} if paired else task_schedule(splits, cfg, params.runtime.seed)
    samples = []
    with tracking.stage_run("prepare", params, ["prepare"], root), atomic_dir(paths.data) as out:
        for image in tqdm(images, desc="prepare", unit="image"):
            split = splits[image.name]
            samples += cut_samples(image, split, cfg, params.runtime.seed, out, schedule.get(image.name))
        manifest = {"patch_size": cfg.patch_size, "source": cfg.source.kind,
                    "splits": {s: sorted(n for n, v in splits.items() if v == s) for s in SPLITS},
                    "samples": samples}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        counts = {s: sum(x["split"] == s for x in samples) for s in SPLITS}
        mlflow.log_metrics({f"patches.{s}": n for s, n in counts.items()} | {"source_images": len(images)})
        mlflow.log_artifact(str(out / "manifest.json"))
    print(f"prepare: {len(images)} source images -> {counts} patches in {paths.data}")
    return counts


def load_sources(cfg: PrepareConfig, endpoint: str | None = None) -> list[SourceImage]:
    src = cfg.source
    if src.kind == "skimage":
        images = load_skimage(src.images)
    elif src.kind == "faces":
        images = load_faces(src.face_count, cfg.patch_size)
    else:  # folder or pairs, local or s3://bucket/prefix
        with local_source(src.path, endpoint) as folder:
            images = load_folder(folder) if src.kind == "folder" else load_pairs(folder)
    for im in images:
        h, w = im.gt.shape[:2]
        if min(h, w) < cfg.patch_size:
            raise DataError(f"{src.path or 'skimage.data'}/{im.name}: {w}x{h} is smaller than "
                            f"prepare.patch_size={cfg.patch_size}")
    names = [im.name for im in images]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{src.path or 'prepare.source.images'}: duplicate image names {dup}")
    return images


def split_by_source(names: list[str], cfg: PrepareConfig, seed: int) -> dict[str, str]:
    """Assign each source image to one split, so no test image leaks into train."""
    where = cfg.source.path or "prepare.source.images"
    for split in ("val", "test"):
        unknown = sorted(set(getattr(cfg.split, split)) - set(names))
        if unknown:
            raise DataError(f"prepare.split.{split}: {unknown} not among the images of {where}")
    if set(cfg.split.val) & set(cfg.split.test):
        raise DataError(f"prepare.split: {sorted(set(cfg.split.val) & set(cfg.split.test))} in both val and test")
    if len(names) < 3:
        raise DataError(f"{where}: {len(names)} image(s); need at least 3 (train, val and test "
                        "are split by source image)")
    assigned = {n: "val" for n in cfg.split.val} | {n: "test" for n in cfg.split.test}
    rest = [n for n in sorted(names) if n not in assigned]
    np.random.default_rng(seed).shuffle(rest)
    for split, frac in (("test", cfg.split.test_fraction), ("val", cfg.split.val_fraction)):
        if not getattr(cfg.split, split):
            take = max(1, round(frac * len(names)))
            assigned |= {n: split for n in rest[:take]}
            rest = rest[take:]
    if not rest:
        raise DataError(f"{where}: no images left for train after the val/test split")
    return assigned | {n: "train" for n in rest}


def _rng(seed: int, *keys: str) -> np.random.Generator:
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


def task_schedule(splits: dict[str, str], cfg: PrepareConfig, seed: int) -> dict[str, list[str]]:
    """The primary task of every patch, stratified per split: each split's patches are shared
    among the tasks by weight (`task_counts`) and shuffled over its images (seeded), so every
    task is in every split that has at least as many patches as there are tasks. A task that
    val or test would have and train would not is an error naming both (the task-conditioned
    restorer learns only the tasks it was trained on)."""
    weights = {n: t.weight for n, t in cfg.degradations.tasks.items() if t.weight > 0}
    schedule, covered, totals = {}, {}, {}
    for split in SPLITS:
        names = sorted(n for n, s in splits.items() if s == split)
        per_image = cfg.patches_per_image[split]
        totals[split] = per_image * len(names)
        rng = _rng(seed, split, "tasks")
        counts = task_counts(totals[split], weights, rng)
        order = [t for t, c in counts.items() for _ in range(c)]
        rng.shuffle(order)
        schedule |= {n: order[i * per_image:(i + 1) * per_image] for i, n in enumerate(names)}
        covered[split] = {t for t, c in counts.items() if c}
    for split in ("val", "test"):
        missing = sorted(covered[split] - covered["train"])
        if missing:
            raise DataError(f"prepare: task '{missing[0]}' is in the {split} split but not in train "
                            f"({len(covered['train'])} of {len(weights)} tasks fit in train's "
                            f"{totals['train']} patches); raise prepare.patches_per_image.train "
                            "or add training images")
    return schedule


def draw_chain(cfg: PrepareConfig, rng: np.random.Generator, first: str) -> list[tuple[str, dict]]:
    """The primary task `first`; with prob. mix_prob a second, different task after it."""
    tasks = {n: t for n, t in cfg.degradations.tasks.items() if t.weight > 0}
    names = sorted(tasks)
    chain = [first]
    others = [n for n in names if n != first]
    if others and rng.random() < cfg.degradations.mix_prob:
        chain.append(others[rng.integers(len(others))])
    return [(n, DEGRADATIONS[n].draw_params(tasks[n].params, rng)) for n in chain]


def area_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (H / factor, W / factor, 3): the mean of each factor x factor block."""
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64)
    return (blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def cut_samples(image: SourceImage, split: str, cfg: PrepareConfig, seed: int, out: Path,
                tasks: list[str] | None = None) -> list[dict]:
    """The image's patches of `split`; `tasks`: the primary task of each (`task_schedule`)."""
    rng = _rng(seed, split, image.name)
    size = cfg.patch_size
    h, w = image.gt.shape[:2]
    (out / split / "gt").mkdir(parents=True, exist_ok=True)
    (out / split / "lq").mkdir(parents=True, exist_ok=True)
    samples = []
    for k in range(cfg.patches_per_image[split]):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        gt = image.gt[y:y + size, x:x + size]
        if image.lq is not None:
            lq, chain, task = image.lq[y:y + size, x:x + size], [], "pairs"
        else:
            chain = draw_chain(cfg, rng, tasks[k])
            lq, task = degrade(gt / 255.0, chain, rng), chain[0][0]
        if cfg.lq_scale > 1:
            lq = area_downscale(lq, cfg.lq_scale)
        sid = f"{image.name}_{k:04d}"
        files = {}
        for kind, arr in (("gt", gt), ("lq", lq)):
            rel = f"{split}/{kind}/{sid}.png"
            Image.fromarray(np.ascontiguousarray(arr)).save(out / rel)
            files[kind] = rel
        samples.append({
            "id": sid, "split": split, "source": image.name, "task": task, "crop": [y, x],
            "degradations": [{"name": n, "params": p} for n, p in chain],
            "gt": files["gt"], "lq": files["lq"],
            "sha256_gt": hashlib.sha256(gt.tobytes()).hexdigest(),
            "sha256_lq": hashlib.sha256(np.ascontiguousarray(lq).tobytes()).hexdigest(),
        })
    return samples
