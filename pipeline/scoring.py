"""Scoring a split's restorations batch by batch: what `evaluate` reports for the test split and
for each benchmark folder, and the paired comparison of a row with SFT.

`score_split` streams a split through a DataLoader: each batch is restored by every model (at
each sampler setting), the hack controls are applied to SFT's output, and every output is
scored by the `Judges` (pyiqa full- and no-reference metrics, the learned reward and judge) and
reduced to per-patch figures and realism statistics before the next batch is read, so memory
does not grow with the split's images. Batch b's noise comes from its own generator
(pipeline/seeding.py), so under a launcher the batches are shared among the processes and the
main process gets what one process computes. `summarise` turns the per-patch figures into the
means, per-task means, paired bootstrap intervals against SFT and realism figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import Params, SamplingConfig
from pipeline.data.dataset import PairedSplit, at_gt_size
from pipeline.models.restorer import Restorer
from pipeline.models.sampling import restore_batch
from pipeline.rewards import iqa
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.realism import MIN_TASK_PATCHES, Realism, statistics
from pipeline.seeding import batch_generator


@dataclass
class Judges:
    """What scores each image: pyiqa full-reference metrics (`fr`, against GT) and no-reference
    ones (`nr`), and further no-reference `scorers` by name (higher is better: the learned
    reward); `weights_dir`: where pyiqa's weight files lie (None: pyiqa's cache)."""

    fr: list[str]
    nr: list[str]
    scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    weights_dir: Path | None = None

    def no_reference(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = {m: iqa.score(m, images, weights_dir=self.weights_dir) for m in self.nr}
        with torch.no_grad():
            return scores | {name: fn(images).cpu() for name, fn in self.scorers.items()}

    def score(self, images: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image scores of `images`: each full-reference metric against `gt`, then the rest."""
        full_reference = {m: iqa.score(m, images, gt, weights_dir=self.weights_dir) for m in self.fr}
        return full_reference | self.no_reference(images)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m: not iqa.lower_is_better(m) for m in self.fr + self.nr} | {m: True for m in self.scorers}


@dataclass
class Scored:
    """Per-patch figures of a split, in row order: `per_image[row][metric]` (N,) for each output
    row and GT (no-reference only), realism `statistics[row]` (N, 24), the perception-distortion
    figures `points[(series, setting)]` (PSNR, scorers, statistics), and the images of the kept
    rows (`shown[row]`: LQ, each model, GT)."""

    per_image: dict[str, dict[str, torch.Tensor]]
    statistics: dict[str, torch.Tensor]
    points: dict[tuple[str, int], dict[str, torch.Tensor]]
    shown: dict[str, torch.Tensor]


CONTROLS_STREAM = 2  # the hack controls' noise (dither): a seed stream of its own, per batch


def score_split(data: torch.utils.data.Dataset, models: dict[str, Restorer], settings: list[SamplingConfig],
                judges: Judges, params: Params, controls: bool = False, keep: list[int] = ()) -> Scored | None:
    """Restore and score a split batch by batch (`evaluate.batch_size`), read by a DataLoader:
    memory holds one batch of images, not the split. For each batch: LQ (at GT size), each
    model's restoration at `settings[0]` (and, with `controls`, the hack controls on SFT's) are
    scored by the `judges`, GT by the no-reference ones; each model at the other settings gives
    perception-distortion figures. Batch b's noise comes from `batch_generator(runtime.seed, b)`
    (the same for every model: paired), so under a launcher the batches are shared among the
    processes (the i-th on rank i mod N) and the main process gets what one process computes;
    the others get None."""
    size = params.evaluate.batch_size
    batches = [list(range(start, min(start + size, len(data)))) for start in range(0, len(data), size)]
    mine = distributed.mine(list(range(len(batches))))
    loader = torch.utils.data.DataLoader(data, batch_sampler=[batches[b] for b in mine],
                                         num_workers=params.runtime.loader_workers)
    bar = tqdm(zip(mine, loader), total=len(mine), desc="evaluate", unit="batch", disable=not distributed.is_main())
    parts = {b: _score_batch(b, batch, data.tasks, models, settings, judges, params.runtime.seed, controls, set(keep))
             for b, batch in bar}
    parts = distributed.gather(parts, list(range(len(batches))))
    if not distributed.is_main():
        return None
    merged = _concat(list(parts.values()))
    return Scored(merged["per_image"], merged["statistics"], merged["points"], merged.get("shown", {}))


def _score_batch(b: int, batch: dict, tasks: list[str], models: dict[str, Restorer], settings: list[SamplingConfig],
                 judges: Judges, seed: int, controls: bool, keep: set[int]) -> dict:
    gt, lq, rows = batch["gt"], batch["lq"], batch["row"].tolist()
    batch_tasks = [tasks[i] for i in rows]
    outputs, points = {"lq": at_gt_size(lq, gt)}, {}
    for i, setting in enumerate(settings):
        for name, model in models.items():
            images = restore_batch(model, lq, batch_tasks, setting, batch_generator(seed, b))
            if i == 0:
                outputs[name] = images
            else:
                points[name, i] = _point(images, gt, judges)
    if controls and "sft" in outputs:
        generator = batch_generator((seed, CONTROLS_STREAM), b)
        outputs |= {f"sft_{name}": hack(outputs["sft"], generator) for name, hack in HACKS.items()}
    points = {(row, 0): _point(images, gt, judges) for row, images in outputs.items() if row != "lq"} | points
    kept = [j for j, row in enumerate(rows) if row in keep]
    part = {"per_image": {row: judges.score(images, gt) for row, images in outputs.items()} | {
                "gt": judges.no_reference(gt)},
            "statistics": {row: statistics(images) for row, images in outputs.items()} | {"gt": statistics(gt)},
            "points": points}
    if keep:
        part["shown"] = {row: outputs[row][kept] for row in ("lq", *models)} | {"gt": gt[kept]}
    return part


def _point(images: torch.Tensor, gt: torch.Tensor, judges: Judges) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        scores = {name: fn(images).cpu() for name, fn in judges.scorers.items()}
    return {"psnr": iqa.psnr(images, gt), **scores, "statistics": statistics(images)}


def _concat(parts: list[dict]) -> dict:
    """The batches' nested dicts of per-patch tensors joined into one, in batch order."""
    first = parts[0]
    return {key: _concat([p[key] for p in parts]) if isinstance(first[key], dict) else torch.cat([p[key] for p in parts])
            for key in first}


def score_outputs(outputs: dict[str, torch.Tensor], data: PairedSplit, fr_metrics: list[str],
                  nr_metrics: list[str], scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                  weights_dir: Path | None = None, seed: int = 0) -> dict:
    """`summarise` of output rows already in memory (each (N, 3, H, W), one per patch of `data`),
    scored by `Judges(fr_metrics, nr_metrics, scorers, weights_dir)`."""
    judges = Judges(fr_metrics, nr_metrics, scorers or {}, weights_dir)
    per_image = {row: judges.score(images, data.gt) for row, images in outputs.items()} | {
        "gt": judges.no_reference(data.gt)}
    stats = {row: statistics(images) for row, images in outputs.items()} | {"gt": statistics(data.gt)}
    return summarise(Scored(per_image, stats, {}, {}), data.tasks, judges, seed)


def summarise(scored: Scored, tasks: list[str], judges: Judges, seed: int = 0) -> dict:
    """Mean of each metric per output row, overall and per task; GT gets the NR metrics; each row
    other than LQ, SFT and GT against SFT (`paired_interval`, resampled with `seed`); and each
    row's distribution-level realism (pipeline/rewards/realism.py: a figure per row, not per patch);
    per task the same (`per_task_vs_sft`)."""
    per_image = scored.per_image

    def means(mask: torch.Tensor) -> dict:
        return {row: {m: round(float(v[mask].mean()), 4) for m, v in scores.items()}
                for row, scores in per_image.items()}

    task_of = np.array(tasks)
    generator = torch.Generator().manual_seed(seed)
    compared = [row for row in per_image if "sft" in per_image and row not in ("lq", "sft", "gt")]
    metrics = {
        "n_test": len(tasks),
        "higher_is_better": judges.higher_is_better | {REALISM: False},
        "overall": means(torch.ones(len(tasks), dtype=torch.bool)),
        # Each row against SFT on the same patches: a row improves a metric only when the
        # interval clears zero on its better side.
        "vs_sft": {row: {m: paired_interval(scores[m], per_image["sft"][m], generator)
                         for m in scores} for row, scores in per_image.items() if row in compared},
        "per_task": {t: {"n": int((task_of == t).sum()), **means(torch.from_numpy(task_of == t))}
                     for t in sorted(set(tasks))},
    }
    realism, halves = Realism(scored.statistics["gt"], tasks), torch.Generator().manual_seed(seed)
    for row in (r for r in scored.statistics if r != "gt"):
        metrics["overall"][row][REALISM] = round(realism.distance(scored.statistics[row]), 4)
    for row in compared:
        metrics["vs_sft"][row][REALISM] = realism.interval(scored.statistics[row], scored.statistics["sft"], halves)
    if compared:
        metrics["per_task_vs_sft"] = per_task_vs_sft(scored, tasks, compared, metrics["per_task"], seed)
    if "gt" in per_image and "sft" in per_image:
        metrics["gt_above_sft"] = gt_above_sft(per_image, task_of, metrics["higher_is_better"])
    return metrics


def gt_above_sft(per_image: dict, task_of: np.ndarray, higher_is_better: dict) -> dict:
    """For each no-reference metric, the share of patches it scores GT better than SFT's output,
    overall and per task. Where a judge does not rank GT above SFT on most of a task's patches,
    its RL-against-SFT figure there is no evidence of better images."""
    out = {}
    for metric, gt in per_image["gt"].items():
        better = (gt - per_image["sft"][metric]) * (1 if higher_is_better[metric] else -1) > 0
        out[metric] = {"overall": round(float(better.float().mean()), 4)} | {
            t: round(float(better[torch.from_numpy(task_of == t)].float().mean()), 4) for t in sorted(set(task_of))}
    return out


def per_task_vs_sft(scored: Scored, tasks: list[str], compared: list[str], per_task: dict, seed: int) -> dict:
    """Each task's `compared` rows against SFT on that task's patches: `paired_interval` of every
    metric and the realism interval of a `Realism` of the task's GT alone (its distance is added
    to `per_task`'s rows). Own generators, so the overall intervals are the same with or without it."""
    per_image, generator, halves = scored.per_image, torch.Generator().manual_seed(seed + 1), \
        torch.Generator().manual_seed(seed + 2)
    task_of, out = np.array(tasks), {}
    for task in sorted(set(tasks)):
        mask = torch.from_numpy(task_of == task)
        out[task] = {row: {m: paired_interval(v[mask], per_image["sft"][m][mask], generator)
                           for m, v in per_image[row].items()} for row in compared}
        stats = {row: s[mask] for row, s in scored.statistics.items()}
        if int(mask.sum()) < MIN_TASK_PATCHES:  # too few patches for a distance of their own
            continue
        realism = Realism(stats["gt"], [task] * int(mask.sum()))
        for row in (r for r in stats if r != "gt" and r in per_task[task]):
            per_task[task][row][REALISM] = round(realism.distance(stats[row]), 4)
        for row in compared:
            out[task][row][REALISM] = realism.interval(stats[row], stats["sft"], halves)
    return out


REALISM = "realism"  # MMD^2 x 100 of the outputs' image statistics from GT's, per task, averaged


BOOTSTRAP_RESAMPLES = 2000


def paired_interval(row: torch.Tensor, sft: torch.Tensor, generator: torch.Generator,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """Mean per-patch difference row - SFT and its 95 % percentile bootstrap interval over
    patches (the same resampled patches for both: paired)."""
    diff = (row - sft).double()
    idx = torch.randint(0, len(diff), (resamples, len(diff)), generator=generator)
    lo, hi = torch.quantile(diff[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": round(float(diff.mean()), 4), "lo": round(lo, 4), "hi": round(hi, 4)}
