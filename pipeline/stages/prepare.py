"""`prepare`: images -> HQ patches + seeded degraded LQ twins, split by source image.

Output (replaced whole, never partially): `data/prepared/{train,val,test}/{gt,lq}/*.png` and
`data/prepared/manifest.json` with each sample's task, source, degradation chain and hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import tracking
from pipeline.atomic import atomic_dir
from pipeline.config import Params, PrepareConfig
from pipeline.data import degradations
from pipeline.data.patches import cut_patches, seeded_rng, split_tasks
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
        tasks = split_tasks(names, per_image, weights, seeded_rng(seed, split, "tasks"))
        schedule |= tasks
        covered[split] = {t for image_tasks in tasks.values() for t in image_tasks}
    for split in ("val", "test"):
        missing = sorted(covered[split] - covered["train"])
        if missing:
            raise DataError(f"prepare: task '{missing[0]}' is in the {split} split but not in train "
                            f"({len(covered['train'])} of {len(weights)} tasks fit in train's "
                            f"{totals['train']} patches); raise prepare.patches_per_image.train "
                            "or add training images")
    return schedule


def cut_samples(image: SourceImage, split: str, cfg: PrepareConfig, seed: int, out: Path,
                tasks: list[str] | None = None) -> list[dict]:
    """The image's patches of `split` as files; `tasks`: the primary task of each (`task_schedule`)."""
    (out / split / "gt").mkdir(parents=True, exist_ok=True)
    (out / split / "lq").mkdir(parents=True, exist_ok=True)
    samples = []
    patches = cut_patches(image, seeded_rng(seed, split, image.name), cfg.patches_per_image[split],
                          cfg.patch_size, cfg.lq_scale, cfg.degradations, tasks, cfg.min_patch_std)
    for patch in patches:
        sid = f"{image.name}_{patch.index:04d}"
        files = {}
        for kind, arr in (("gt", patch.gt), ("lq", patch.lq)):
            rel = f"{split}/{kind}/{sid}.png"
            Image.fromarray(np.ascontiguousarray(arr)).save(out / rel)
            files[kind] = rel
        samples.append({
            "id": sid, "split": split, "source": image.name, "task": patch.task, "crop": list(patch.crop),
            "degradations": [{"name": n, "params": p} for n, p in patch.chain],
            "gt": files["gt"], "lq": files["lq"],
            "sha256_gt": hashlib.sha256(patch.gt.tobytes()).hexdigest(),
            "sha256_lq": hashlib.sha256(np.ascontiguousarray(patch.lq).tobytes()).hexdigest(),
        })
    return samples
