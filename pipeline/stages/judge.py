"""`judge`: train the held-out judge, a second no-reference reward model that `evaluate` reports
beside the reward, on images neither the reward nor RL ever sees.

The reward RL optimises is also what `evaluate` would otherwise score its outputs with: a gain
in it may be the policy exploiting that model. The judge is a model of the same kind
(pipeline/models/reward_model.py), trained by the same loop (pipeline/rewards/training.py:
ranked pairs GT over LQ, GT over the SFT output, the SFT output over its hack controls, ...,
the Bradley-Terry loss of RankIQA: Liu et al., "RankIQA: Learning from Rankings for
No-reference Image Quality Assessment", 2017) but on patches of its own source images
(`judge.source`, none of prepare's, by name and by pixels: refused otherwise), cut and degraded as
prepare does with its own seed (`judge.seed`), which also draws its batches and initial weights.
RL cannot train on it (`rl.reward` refuses the name). Its checks (GT above LQ, GT above the SFT
output, every hack control below SFT) are measured on a held-out share of its patches
(`judge.holdout_fraction`): every figure in checkpoints/judge/checks.json, the headline in
metrics/judge.json; checkpoints/judge also holds the model and sources.json (the images and patch
counts it was trained on). One process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import torch

from pipeline import tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import ConfigError, JudgeConfig, Params, flatten
from pipeline.data.benchmarks import cut_split, load_hq_images
from pipeline.data.dataset import PairedSplit
from pipeline.data.sources import DataError, SourceImage, load_skimage
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.models.sampling import restore
from pipeline.paths import Paths
from pipeline.rewards.checks import CHECKS_FILE, headline
from pipeline.rewards.training import fresh_degradations, reward_checks, train_reward_model
from pipeline.storage import endpoint_url

SECTIONS = ["judge"]
SOURCES = "sources.json"  # in checkpoints/judge: the images and patch counts the judge was trained on
TRAIN_RESTORATIONS, HELD_OUT_RESTORATIONS = 1, 2  # noise streams of the SFT restorations


def run(params: Params, root: Path = Path(".")) -> dict:
    """Cut the judge's patches, restore them with the SFT model, train, check, write and log."""
    device = setup_runtime(params.runtime)
    paths, cfg = Paths(root), params.judge
    patches = judge_patches(params)
    generator = torch.Generator().manual_seed(cfg.seed)
    train, held_out = hold_out(patches, cfg.holdout_fraction, generator)
    train = train.subset(torch.randperm(len(train), generator=generator)[: cfg.sft_samples])
    sft = load_restorer(paths.sft_model, params.storage, paths.pretrained).to(device).eval()
    unknown = sorted(set(patches.tasks) - set(sft.tasks or patches.tasks))
    if unknown:
        raise DataError(f"judge: task(s) {unknown} of prepare.degradations unknown to the SFT model in "
                        f"{paths.sft_model}, which knows {sft.tasks}; re-run sft")
    sampling, batch = params.evaluate.sampling, params.evaluate.batch_size
    train_sft = restore(sft, train, cfg.sft_sampling, batch, (cfg.seed, TRAIN_RESTORATIONS), progress=True)
    held_out_sft = restore(sft, held_out, sampling, batch, (cfg.seed, HELD_OUT_RESTORATIONS), progress=True)
    rng = np.random.default_rng(cfg.seed)
    fresh = [fresh_degradations(train.gt, rng) for _ in range(cfg.fresh_negatives)]
    torch.manual_seed(cfg.seed)  # the initial weights: the judge's seed, not the reward's
    with tracking.stage_run("judge", params, SECTIONS, paths.root):
        model = train_reward_model(cfg, train, train_sft, fresh, generator, device, cfg.batch_size, "judge",
                                   paths.resume / "judge")
        checks = reward_checks(model, held_out, held_out_sft, generator)
        counts = {"train": len(train), "held_out": len(held_out)}
        mlflow.log_metrics({k: float(v) for k, v in flatten(checks).items() if not isinstance(v, bool)})
        mlflow.log_metrics({f"patches.{k}": v for k, v in counts.items()})
        with atomic_dir(paths.judge_model) as tmp:
            model.save(tmp)
            (tmp / CHECKS_FILE).write_text(json.dumps(checks, indent=2))
            (tmp / SOURCES).write_text(json.dumps(trained_on(cfg, patches, counts), indent=2))
        with atomic_file(paths.metrics / "judge.json") as tmp:
            tmp.write_text(json.dumps(headline(checks), indent=2))
        for name in (CHECKS_FILE, SOURCES):
            mlflow.log_artifact(str(paths.judge_model / name))
    print(json.dumps(checks, indent=2))
    return checks


def judge_patches(params: Params) -> PairedSplit:
    """`judge.patches_per_image` patches of each `judge.source` image, cut and degraded as
    prepare does (`prepare.patch_size`, `lq_scale`, `degradations`), drawn with `judge.seed`."""
    cfg = params.judge
    images = load_hq_images(cfg.source, "judge.source", endpoint_url(params.storage))
    refuse_prepares_images(images, params)
    origin = cfg.source.path or "skimage.data"
    return cut_split(images, cfg.patches_per_image, params.prepare, cfg.seed, ("judge",), (origin, "judge.source"))


def refuse_prepares_images(images: list[SourceImage], params: Params) -> None:
    """A ConfigError naming the first judge image with the pixels of one of prepare's skimage
    images: the params check names, and skimage has aliases (`cat` is `chelsea`)."""
    if params.prepare.source.kind != "skimage":
        return
    prepares = {_pixels(im): im.name for im in load_skimage(params.prepare.source.images)}
    key = "judge.source.images" if params.judge.source.kind == "skimage" else "judge.source.path"
    for im in images:
        if _pixels(im) in prepares:
            raise ConfigError(f"{key}: '{im.name}' is the image '{prepares[_pixels(im)]}' of prepare.source.images "
                              "(the same pixels); the judge must be trained on images the reward and RL never see")


def _pixels(image: SourceImage) -> str:
    return hashlib.sha256(repr(image.gt.shape).encode() + image.gt.tobytes()).hexdigest()


def hold_out(patches: PairedSplit, fraction: float, generator: torch.Generator) -> tuple[PairedSplit, PairedSplit]:
    """A seeded random `fraction` of the patches (at least one) held out, and the rest to train on."""
    order = torch.randperm(len(patches), generator=generator)
    count = max(1, round(fraction * len(patches)))
    if count >= len(patches):
        raise DataError(f"judge: {len(patches)} patch(es) leave none to train on after holding out "
                        f"judge.holdout_fraction={fraction}; raise judge.patches_per_image")
    return patches.subset(order[count:]), patches.subset(order[:count])


def trained_on(cfg: JudgeConfig, patches: PairedSplit, counts: dict) -> dict:
    """The judge's provenance: its source images (each patch's `source`), seed and patch counts."""
    return {"source": cfg.source.model_dump(mode="json"),
            "images": sorted({s["source"] for s in patches.samples}),
            "seed": cfg.seed, "patches": counts}
