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
run. Under a launcher the restorations are shared among the processes (docs/distributed.md).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from pipeline import distributed, tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params, flatten
from pipeline.data.benchmarks import load_benchmark
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.data.sources import DataError
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.models.restorer import Restorer
from pipeline.models.sampling import restore, restore_split
from pipeline.paths import Paths
from pipeline.redaction import redact
from pipeline.rewards import iqa
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.realism import Realism
from pipeline.rewards.scorers import build_reward
from pipeline.storage import pyiqa_cache_dir

SECTIONS = ["evaluate"]


def run(params: Params, root: Path = Path(".")) -> dict:
    """Under a launcher (WORLD_SIZE > 1) the restorations of the test split are shared among the
    processes (`restorations`); the main process scores them and writes everything."""
    with distributed.session(setup_runtime(params.runtime)) as device:
        return _evaluate(params, Paths(root), device)


def _evaluate(params: Params, paths: Paths, device: torch.device) -> dict:
    cfg, root = params.evaluate, paths.root
    test = load_split(paths.data, "test")
    checkpoints = {"sft": paths.sft_model} | ({"rl": paths.rl_model} if paths.rl_model.exists() else {})
    models = {row: load_restorer(path, params.storage, paths.pretrained).to(device) for row, path in checkpoints.items()}
    restored = distributed.spread(restorations(models, test, params))
    if not distributed.is_main():
        return {}
    with tracking.stage_run("evaluate", params, SECTIONS, root):
        outputs = {"lq": test.lq_full} | {row: restored[row, 0] for row in models}
        shown = dict(outputs)  # the grid: LQ | SFT | RL | GT
        generator = torch.Generator().manual_seed(params.runtime.seed)
        outputs |= {f"sft_{name}": hack(outputs["sft"], generator) for name, hack in HACKS.items()}
        scorers = {}
        if paths.reward_model.exists():
            learned = build_reward({"learned": 1.0}, device, learned_path=paths.reward_model)
            scorers["reward"] = lambda images: learned(images.to(device))
        weights_dir = pyiqa_cache_dir(params.storage)
        metrics = score_outputs(outputs, test, cfg.fr_metrics, cfg.nr_metrics, scorers,
                                weights_dir=weights_dir, seed=params.runtime.seed)
        metrics["sampling"] = cfg.sampling.model_dump()
        if cfg.benchmarks:
            metrics["benchmarks"] = {name: score_benchmark(name, models, params, scorers, weights_dir)
                                     for name in cfg.benchmarks}
        headline, detail = split_headline(metrics)
        for name, content in (("evaluate.json", headline), ("evaluate_detail.json", detail)):
            with atomic_file(paths.metrics / name) as tmp:
                tmp.write_text(json.dumps(content, indent=2))
        save_grid(paths.plots / "eval_grid.png", shown, test, cfg.grid_images)
        points = frontier(outputs, restored, test, params, scorers)
        save_frontier(paths.plots / "frontier.csv", points)
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


def restorations(models: dict[str, Restorer], test: PairedSplit, params: Params) -> dict[tuple[str, int], Callable]:
    """Every restoration of the test split `evaluate` scores, keyed (model, setting): setting 0
    is `evaluate.sampling`, 1.. the `evaluate.frontier` settings. Each seeds its own generator
    with `runtime.seed`, so they can run in any order, on any process."""
    cfg = params.evaluate

    def job(model: Restorer, setting) -> Callable[[], torch.Tensor]:
        return lambda: restore(model, test, setting, cfg.batch_size, torch.Generator().manual_seed(params.runtime.seed),
                               progress=True)

    return {(name, i): job(model, setting) for i, setting in enumerate([cfg.sampling, *cfg.frontier])
            for name, model in models.items()}


def frontier(outputs: dict[str, torch.Tensor], restored: dict[tuple[str, int], torch.Tensor], test: PairedSplit,
             params: Params, scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> list[dict]:
    """The perception-distortion picture: for SFT and RL at `evaluate.sampling` and at each
    `evaluate.frontier` setting (`restored`), and for the hack controls at `evaluate.sampling`
    (`outputs`), the test split's mean PSNR, its realism and its mean learned reward (when there
    is one). RL helps where its points lie beyond SFT's curve, not where they slide along it."""
    cfg, realism = params.evaluate, Realism(test.gt, test.tasks)

    def point(series: str, setting, images: torch.Tensor) -> dict:
        figures = {"psnr": float(iqa.psnr(images, test.gt).mean()), "realism": realism.distance(images)}
        with torch.no_grad():
            figures |= {name: float(fn(images).mean()) for name, fn in scorers.items()}
        return {"series": series, "steps": setting.steps, "eta": setting.eta, "samples": setting.samples} | {
            k: round(v, 4) for k, v in figures.items()}

    points = [point(row, cfg.sampling, outputs[row]) for row in outputs if row != "lq"]
    return points + [point(name, cfg.frontier[i - 1], images) for (name, i), images in restored.items() if i > 0]


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


def score_benchmark(name: str, models: dict[str, Restorer], params: Params,
                    scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]], weights_dir: Path | None) -> dict:
    """LQ, each model and GT on one benchmark folder (`evaluate.benchmarks`), as for the test split."""
    from pipeline.storage import endpoint_url

    bench = params.evaluate.benchmarks[name]
    data = load_benchmark(name, bench, params.prepare, params.runtime.seed, endpoint_url(params.storage))
    for model in models.values():
        unknown = sorted(set(data.tasks) - set(model.tasks or data.tasks))
        if unknown:
            raise DataError(f"evaluate.benchmarks.{name}: task(s) {unknown} unknown to the restorer, which knows "
                            f"{model.tasks}" + ("; set evaluate.benchmarks." + name + ".task to the degradation "
                                                "its pairs show" if unknown == ["pairs"] else ""))
    outputs = {"lq": data.lq_full} | {row: restore_split(m, data, params, progress=True) for row, m in models.items()}
    block = score_outputs(outputs, data, params.evaluate.fr_metrics, params.evaluate.nr_metrics, scorers,
                          weights_dir=weights_dir, seed=params.runtime.seed)
    return block | {"path": redact(bench.path)}


def score_outputs(outputs: dict[str, torch.Tensor], data: PairedSplit, fr_metrics: list[str],
                  nr_metrics: list[str], scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                  weights_dir: Path | None = None, seed: int = 0) -> dict:
    """Mean of each metric per output row, overall and per task; GT gets the NR metrics; and
    each row other than LQ, SFT and GT against SFT (`paired_interval`, resampled with `seed`).

    `scorers`: further no-reference scores by name (higher is better), e.g. the learned reward;
    `weights_dir`: where pyiqa's weight files lie (None: pyiqa's cache).
    """
    scorers = scorers or {}

    def no_reference(images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = {m: iqa.score(m, images, weights_dir=weights_dir) for m in nr_metrics}
        with torch.no_grad():
            return scores | {name: fn(images).cpu() for name, fn in scorers.items()}

    per_image: dict[str, dict[str, torch.Tensor]] = {}
    for row, images in outputs.items():
        full_reference = {m: iqa.score(m, images, data.gt, weights_dir=weights_dir) for m in fr_metrics}
        per_image[row] = full_reference | no_reference(images)
    per_image["gt"] = no_reference(data.gt)
    directions = {m: not iqa.lower_is_better(m) for m in fr_metrics + nr_metrics} | {m: True for m in scorers}

    def means(mask: torch.Tensor) -> dict:
        return {row: {m: round(float(v[mask].mean()), 4) for m, v in scores.items()}
                for row, scores in per_image.items()}

    tasks = np.array(data.tasks)
    generator = torch.Generator().manual_seed(seed)
    compared = [row for row in per_image if "sft" in per_image and row not in ("lq", "sft", "gt")]
    metrics = {
        "n_test": len(data),
        "higher_is_better": directions | {REALISM: False},
        "overall": means(torch.ones(len(data), dtype=torch.bool)),
        # Each row against SFT on the same patches: a row improves a metric only when the
        # interval clears zero on its better side.
        "vs_sft": {row: {m: paired_interval(scores[m], per_image["sft"][m], generator)
                         for m in scores} for row, scores in per_image.items() if row in compared},
        "per_task": {t: {"n": int((tasks == t).sum()), **means(torch.from_numpy(tasks == t))}
                     for t in sorted(set(tasks))},
    }
    # Distribution-level realism (pipeline/rewards/realism.py): a figure per row, not per patch.
    realism, halves = Realism(data.gt, data.tasks), torch.Generator().manual_seed(seed)
    for row, images in outputs.items():
        metrics["overall"][row][REALISM] = round(realism.distance(images), 4)
    for row in compared:
        metrics["vs_sft"][row][REALISM] = realism.interval(outputs[row], outputs["sft"], halves)
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


def save_grid(path: Path, outputs: dict[str, torch.Tensor], data: PairedSplit, n: int, zoom: int = 4) -> None:
    """Rows of LQ | each output | GT, one sample per task in turn, enlarged for viewing; the
    columns are named on top, each row's task on the left, and each output's PSNR against GT
    (dB) sits in its top-left corner."""
    from PIL import ImageDraw

    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(data.tasks):
        by_task.setdefault(t, []).append(i)
    picks, depth = [], 0
    while len(picks) < min(n, len(data)):
        picks += [ids[depth] for ids in by_task.values() if depth < len(ids)][: n - len(picks)]
        depth += 1
    columns = list(outputs.values()) + [data.gt]
    names = [name.upper() for name in outputs] + ["GT (PSNR dB in the corners)"]
    rows = [torch.cat([col[i] for col in columns], dim=2) for i in picks]
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    grid = np.kron(grid, np.ones((zoom, zoom, 1), np.uint8))
    cell_h, cell_w = data.gt.shape[2] * zoom, data.gt.shape[3] * zoom
    label_w = 6 * max(len(data.tasks[i]) for i in picks) + 8
    canvas = Image.new("RGB", (label_w + grid.shape[1], GRID_MARGIN + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, GRID_MARGIN))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((label_w + c * cell_w + 3, 2), name, fill="black")
    for r, i in enumerate(picks):
        top = GRID_MARGIN + r * cell_h
        draw.text((3, top + cell_h // 2 - 5), data.tasks[i], fill="black")
        for c, col in enumerate(columns[:-1]):
            db = float(iqa.psnr(col[i:i + 1].float().cpu(), data.gt[i:i + 1].float().cpu()))
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
