"""`evaluate`: restore the test split and score LQ, each model's output, the hack controls and GT.

Rows: LQ, SFT, RL (when `checkpoints/rl` exists), the hack controls applied to the SFT output
(dither sigma 1/255, unsharp mask, 3x3 blur, contrast x1.05: an RL gain smaller than a
control's is no gain) and GT. Full-reference metrics (`evaluate.fr_metrics`, by pyiqa: PSNR,
SSIM, and GMSD, FSIM and NLPD, judges RL never trained on) compare with GT; no-reference
metrics (PIQE, and the learned `reward` when `checkpoints/reward` exists) score each image
alone, GT included. `realism` (pipeline/rewards/realism.py) is how far the outputs' image
statistics lie from GT's as a distribution, per task, averaged over the tasks (lower is closer;
overall only). Figures are given overall and per degradation task, and for RL and each
control against SFT: the mean paired difference with a 95 % bootstrap interval over patches,
so a row "improves" a metric only when its interval clears zero.
Output: `metrics/evaluate.json` (DVC metrics: every row overall, RL against SFT),
`metrics/evaluate_detail.json` (per task, every row against SFT), `plots/eval_grid.png`
(LQ | SFT | RL | GT, labelled), the perception-distortion picture `plots/frontier.csv` and
`.png` (SFT and RL across sampler settings, the controls as points), and the same in an MLflow
run. The split is streamed: a DataLoader reads it batch by batch, and each batch is restored and
scored before the next, so memory holds per-patch figures, not the split's images. Under a
launcher the batches are shared among the processes (docs/distributed.md).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline import distributed, tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params, SamplingConfig, flatten
from pipeline.data.benchmarks import load_benchmark
from pipeline.data.dataset import PairedSplit, PatchPairs, at_gt_size
from pipeline.data.sources import DataError
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.models.restorer import Restorer
from pipeline.models.sampling import restore_batch
from pipeline.paths import Paths
from pipeline.redaction import redact
from pipeline.rewards import iqa
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.realism import Realism, statistics
from pipeline.rewards.scorers import build_reward
from pipeline.seeding import batch_generator
from pipeline.storage import pyiqa_cache_dir

SECTIONS = ["evaluate"]


def run(params: Params, root: Path = Path(".")) -> dict:
    """Under a launcher (WORLD_SIZE > 1) the batches of the test split (and of each benchmark)
    are shared among the processes (`score_split`); the main process summarises and writes."""
    with distributed.session(setup_runtime(params.runtime)) as device:
        return _evaluate(params, Paths(root), device)


def _evaluate(params: Params, paths: Paths, device: torch.device) -> dict:
    cfg, root, seed = params.evaluate, paths.root, params.runtime.seed
    test = PatchPairs(paths.data, "test")  # read batch by batch
    checkpoints = {"sft": paths.sft_model} | ({"rl": paths.rl_model} if paths.rl_model.exists() else {})
    models = {row: load_restorer(path, params.storage, paths.pretrained).to(device) for row, path in checkpoints.items()}
    scorers = {}
    if paths.reward_model.exists():
        learned = build_reward({"learned": 1.0}, device, learned_path=paths.reward_model)
        scorers["reward"] = lambda images: learned(images.to(device)).cpu()
    judges = Judges(cfg.fr_metrics, cfg.nr_metrics, scorers, pyiqa_cache_dir(params.storage))
    shown = grid_rows(test.tasks, cfg.grid_images)
    scored = score_split(test, models, [cfg.sampling, *cfg.frontier], judges, params, controls=True, keep=shown)
    benchmarks = {name: score_benchmark(name, models, params, judges) for name in cfg.benchmarks}
    if not distributed.is_main():
        return {}
    with tracking.stage_run("evaluate", params, SECTIONS, root):
        metrics = summarise(scored, test.tasks, judges, seed)
        metrics["sampling"] = cfg.sampling.model_dump()
        if benchmarks:
            metrics["benchmarks"] = benchmarks
        headline, detail = split_headline(metrics)
        for name, content in (("evaluate.json", headline), ("evaluate_detail.json", detail)):
            with atomic_file(paths.metrics / name) as tmp:
                tmp.write_text(json.dumps(content, indent=2))
        order = sorted(shown)  # the kept images come in row order; the grid shows them task by task
        columns = {row: images[[order.index(i) for i in shown]] for row, images in scored.shown.items()}
        save_grid(paths.plots / "eval_grid.png", columns, [test.tasks[i] for i in shown])
        save_frontier(paths.plots / "frontier.csv", frontier(scored, test.tasks, [cfg.sampling, *cfg.frontier]))
        mlflow.log_artifact(str(paths.plots / "frontier.csv"))
        mlflow.log_artifact(str(paths.plots / "frontier.png"))
        mlflow.log_metrics({k: v for k, v in flatten(metrics["overall"]).items()})
        mlflow.log_metrics({f"task.{k}": v for k, v in flatten(metrics["per_task"]).items()})
        mlflow.log_metrics({f"vs_sft.{k}": v for k, v in flatten(metrics["vs_sft"]).items()})
        for name, block in metrics.get("benchmarks", {}).items():
            mlflow.log_metrics({f"benchmark.{name}.{k}": v for k, v in flatten(block["overall"]).items()})
        mlflow.log_artifact(str(paths.metrics / "evaluate.json"))
        mlflow.log_artifact(str(paths.metrics / "evaluate_detail.json"))
        mlflow.log_artifact(str(paths.plots / "eval_grid.png"))
    print(format_table(metrics))
    return metrics


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
    row and GT (no-reference only), realism `statistics[row]` (N, 28), the perception-distortion
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


def frontier(scored: Scored, tasks: list[str], settings: list[SamplingConfig]) -> list[dict]:
    """The perception-distortion picture: for SFT and RL at `evaluate.sampling` and at each
    `evaluate.frontier` setting, and for the hack controls at `evaluate.sampling`, the test
    split's mean PSNR, its realism and its mean learned reward (when there is one). RL helps
    where its points lie beyond SFT's curve, not where they slide along it."""
    realism = Realism(scored.statistics["gt"], tasks)

    def point(series: str, setting: SamplingConfig, figures: dict[str, torch.Tensor]) -> dict:
        means = {"psnr": float(figures["psnr"].mean()), "realism": realism.distance(figures["statistics"])}
        means |= {k: float(v.mean()) for k, v in figures.items() if k not in ("psnr", "statistics")}
        return {"series": series, "steps": setting.steps, "eta": setting.eta, "samples": setting.samples} | {
            k: round(v, 4) for k, v in means.items()}

    return [point(series, settings[i], figures) for (series, i), figures in scored.points.items()]


def save_frontier(path: Path, points: list[dict]) -> None:
    """plots/frontier.csv (a DVC plot) and plots/frontier.png: PSNR against realism and against
    each score, one colour per model, the controls as labelled crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    scores = [k for k in points[0] if k not in ("series", "steps", "eta", "samples", "psnr")]
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 4), squeeze=False)
    for ax, score in zip(axes[0], scores):
        for series in dict.fromkeys(p["series"] for p in points):
            mine = [p for p in points if p["series"] == series]
            control = series not in ("sft", "rl")
            ax.scatter([p["psnr"] for p in mine], [p[score] for p in mine], marker="x" if control else "o",
                       label=None if control else series.upper())
            for p in mine:
                label = series if control else f"{p['steps']} st, eta {p['eta']:g}, x{p['samples']}"
                ax.annotate(label, (p["psnr"], p[score]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("PSNR (dB) ->")
        ax.set_ylabel(f"{score} ({'<- lower is closer to GT' if score == REALISM else 'higher is better ->'})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def score_benchmark(name: str, models: dict[str, Restorer], params: Params, judges: Judges) -> dict | None:
    """LQ, each model and GT on one benchmark folder (`evaluate.benchmarks`), as for the test
    split (its patches are cut in memory; scored batch by batch); None on the other processes."""
    from pipeline.storage import endpoint_url

    bench = params.evaluate.benchmarks[name]
    data = load_benchmark(name, bench, params.prepare, params.runtime.seed, endpoint_url(params.storage))
    for model in models.values():
        unknown = sorted(set(data.tasks) - set(model.tasks or data.tasks))
        if unknown:
            raise DataError(f"evaluate.benchmarks.{name}: task(s) {unknown} unknown to the restorer, which knows "
                            f"{model.tasks}" + ("; set evaluate.benchmarks." + name + ".task to the degradation "
                                                "its pairs show" if unknown == ["pairs"] else ""))
    scored = score_split(data, models, [params.evaluate.sampling], judges, params)
    if scored is None:
        return None
    return summarise(scored, data.tasks, judges, params.runtime.seed) | {"path": redact(bench.path)}


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
    row's distribution-level realism (pipeline/rewards/realism.py: a figure per row, not per patch)."""
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
    return metrics


REALISM = "realism"  # MMD^2 x 100 of the outputs' image statistics from GT's, per task, averaged


DETAIL = ("per_task", "vs_sft")  # in metrics/evaluate_detail.json; the headline keeps RL against SFT


def split_headline(metrics: dict) -> tuple[dict, dict]:
    """(metrics/evaluate.json, metrics/evaluate_detail.json): the headline DVC shows with
    `dvc metrics show`/`diff` (every row overall, RL against SFT; the same for each benchmark),
    and the detail (per task, every row against SFT) that `restorl repro` prints and MLflow
    keeps. `merge` undoes it."""
    headline = {k: v for k, v in metrics.items() if k not in (*DETAIL, "benchmarks")}
    if "rl" in metrics.get("vs_sft", {}):
        headline["rl_vs_sft"] = metrics["vs_sft"]["rl"]
    detail = {k: metrics[k] for k in DETAIL if k in metrics}
    if metrics.get("benchmarks"):
        parts = {name: split_headline(block) for name, block in metrics["benchmarks"].items()}
        headline["benchmarks"] = {name: h for name, (h, _) in parts.items()}
        detail["benchmarks"] = {name: d for name, (_, d) in parts.items()}
    return headline, detail


def merge(headline: dict, detail: dict) -> dict:
    merged = {k: v for k, v in headline.items() if k not in ("rl_vs_sft", "benchmarks")}
    merged |= {k: v for k, v in detail.items() if k != "benchmarks"}
    if headline.get("benchmarks"):
        merged["benchmarks"] = {name: merge(block, detail.get("benchmarks", {}).get(name, {}))
                                for name, block in headline["benchmarks"].items()}
    return merged


BOOTSTRAP_RESAMPLES = 2000


def paired_interval(row: torch.Tensor, sft: torch.Tensor, generator: torch.Generator,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """Mean per-patch difference row - SFT and its 95 % percentile bootstrap interval over
    patches (the same resampled patches for both: paired)."""
    diff = (row - sft).double()
    idx = torch.randint(0, len(diff), (resamples, len(diff)), generator=generator)
    lo, hi = torch.quantile(diff[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": round(float(diff.mean()), 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def verdict(interval: dict[str, float], higher_is_better: bool) -> str:
    """better | worse | unclear: whether the interval clears zero, read in the metric's direction."""
    lo, hi = (interval["lo"], interval["hi"]) if higher_is_better else (-interval["hi"], -interval["lo"])
    return "better" if lo > 0 else "worse" if hi < 0 else "unclear"


GRID_MARGIN = 14  # px of the label strips: column names on top, task names on the left


def grid_rows(tasks: list[str], n: int) -> list[int]:
    """The rows the image grid shows: up to `n`, one per task in turn."""
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    picks, depth = [], 0
    while len(picks) < min(n, len(tasks)):
        picks += [ids[depth] for ids in by_task.values() if depth < len(ids)][: n - len(picks)]
        depth += 1
    return picks


def save_grid(path: Path, columns: dict[str, torch.Tensor], tasks: list[str], zoom: int = 4) -> None:
    """Rows of LQ | each output | GT (`columns`, the last one GT; each (n, 3, H, W), row i of
    task `tasks[i]`), enlarged for viewing; the columns are named on top, each row's task on the
    left, and each output's PSNR against GT (dB) sits in its top-left corner."""
    from PIL import ImageDraw

    *outputs, gt = columns.values()
    names = [name.upper() for name in list(columns)[:-1]] + ["GT (PSNR dB in the corners)"]
    rows = [torch.cat([col[i] for col in columns.values()], dim=2) for i in range(len(tasks))]
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    grid = np.kron(grid, np.ones((zoom, zoom, 1), np.uint8))
    cell_h, cell_w = gt.shape[2] * zoom, gt.shape[3] * zoom
    label_w = 6 * max(len(t) for t in tasks) + 8
    canvas = Image.new("RGB", (label_w + grid.shape[1], GRID_MARGIN + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, GRID_MARGIN))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((label_w + c * cell_w + 3, 2), name, fill="black")
    for r, task in enumerate(tasks):
        top = GRID_MARGIN + r * cell_h
        draw.text((3, top + cell_h // 2 - 5), task, fill="black")
        for c, col in enumerate(outputs):
            db = float(iqa.psnr(col[r:r + 1].float().cpu(), gt[r:r + 1].float().cpu()))
            left = label_w + c * cell_w
            draw.rectangle((left, top, left + 40, top + 11), fill="black")
            draw.text((left + 2, top), f"{db:.1f}", fill="white")
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")


def format_table(metrics: dict) -> str:
    """Plain-text table: one line per (task, row), one column per metric."""
    names = list(metrics["higher_is_better"])
    arrows = {m: "↑" if up else "↓" for m, up in metrics["higher_is_better"].items()}
    header = f"{'task':<16}{'n':>5}  {'output':<14}" + "".join(f"{m + arrows[m]:>10}" for m in names)
    lines = [header, "-" * len(header)]
    blocks = [("overall", {"n": metrics["n_test"], **metrics["overall"]})] + list(metrics.get("per_task", {}).items())
    for task, block in blocks:
        for row, scores in ((k, v) for k, v in block.items() if k != "n"):
            cells = "".join(f"{scores[m]:>10.3f}" if m in scores else f"{'':>10}" for m in names)
            lines.append(f"{task:<16}{block['n']:>5}  {row:<14}{cells}")
    if metrics.get("vs_sft"):
        lines += ["", "Against SFT on the same patches: mean difference [95 % bootstrap interval] and verdict"]
        for row, figures in metrics["vs_sft"].items():
            cells = [f"{m} {f['diff']:+.4g} [{f['lo']:+.4g}, {f['hi']:+.4g}] "
                     f"{verdict(f, metrics['higher_is_better'][m])}" for m, f in figures.items()]
            lines.append(f"  {row:<14}" + ";  ".join(cells))
    for name, block in metrics.get("benchmarks", {}).items():
        lines += ["", f"Benchmark '{name}' ({block['path']}):", format_table(block)]
    return "\n".join(lines)
