"""`evaluate`: restore the test split and score LQ, each model's output, the hack controls and GT.

Rows: LQ, SFT, RL (when `checkpoints/rl` exists), the hack controls applied to the SFT output
(dither sigma 1/255, unsharp mask, 3x3 blur, contrast x1.05: an RL gain smaller than a
control's is no gain) and GT. Full-reference metrics (`evaluate.fr_metrics`, by pyiqa: PSNR,
SSIM, and GMSD, FSIM and NLPD, judges RL never trained on) compare with GT; no-reference
metrics (PIQE, the learned `reward` when `checkpoints/reward` exists and the held-out `judge`
when `checkpoints/judge` does: a second learned model, trained on images neither the reward nor
RL saw) score each image alone, GT included. `realism` (pipeline/rewards/realism.py) is how far
the outputs' image statistics lie from GT's as a distribution, per task, averaged over the
tasks (lower is closer; overall only). Figures are given overall and per degradation task, and for RL and each
control against SFT: the mean paired difference with a 95 % bootstrap interval over patches,
so a row "improves" a metric only when its interval clears zero.
Output: `metrics/evaluate.json` (DVC metrics, the headline: the overall SFT and RL rows, RL's
mean difference from SFT per metric and the verdict of its interval for PSNR, reward, judge and
realism), `metrics/evaluate_detail.json` (everything: every row overall and per task, every row
against SFT with its interval, overall and per task, and per no-reference metric the share of
patches it scores GT better than SFT: where a judge does not, its RL figure is no evidence),
`plots/eval_grid.png`
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
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from pipeline import distributed, tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params, SamplingConfig, flatten
from pipeline.data.benchmarks import load_benchmark
from pipeline.data.dataset import PatchPairs
from pipeline.data.sources import DataError
from pipeline.device import setup_runtime
from pipeline.evaluate_record import format_table, verdict
from pipeline.models.loading import load_restorer
from pipeline.models.restorer import Restorer
from pipeline.paths import Paths
from pipeline.redaction import redact
from pipeline.rewards import iqa
from pipeline.rewards.realism import Realism
from pipeline.rewards.scorers import build_reward
from pipeline.scoring import REALISM, Judges, Scored, score_split, summarise
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
    # The learned reward and the held-out judge (trained on images neither the reward nor RL saw).
    scorers = {name: learned_scorer(path, device) for name, path in
               (("reward", paths.reward_model), ("judge", paths.judge_model)) if path.exists()}
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


def learned_scorer(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image scores (on the CPU) of the reward model saved at `path`, higher is better."""
    model = build_reward({"learned": 1.0}, device, learned_path=path)
    return lambda images: model(images.to(device)).cpu()


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
    """LQ, each model, the hack controls on SFT's output and GT on one benchmark folder
    (`evaluate.benchmarks`), as for the test split: a gain on a user's own images is read
    against the same controls (its patches are cut in memory; scored batch by batch); None on
    the other processes."""
    from pipeline.storage import endpoint_url

    bench = params.evaluate.benchmarks[name]
    data = load_benchmark(name, bench, params.prepare, params.runtime.seed, endpoint_url(params.storage))
    for model in models.values():
        unknown = sorted(set(data.tasks) - set(model.tasks or data.tasks))
        if unknown:
            raise DataError(f"evaluate.benchmarks.{name}: task(s) {unknown} unknown to the restorer, which knows "
                            f"{model.tasks}" + ("; set evaluate.benchmarks." + name + ".task to the degradation "
                                                "its pairs show" if unknown == ["pairs"] else ""))
    scored = score_split(data, models, [params.evaluate.sampling], judges, params, controls=True)
    if scored is None:
        return None
    return summarise(scored, data.tasks, judges, params.runtime.seed) | {"path": redact(bench.path)}


HEADLINE_ROWS = ("sft", "rl")  # the overall rows metrics/evaluate.json keeps; the rest is in the detail
# RL against SFT: the headline has each metric's mean difference, and the verdict of its paired
# interval (better | worse | unclear) for these: the training reward, the judges RL never trained
# on that decide "RL improves" (held-out judge, realism) and the fidelity it must not lose (PSNR).
HEADLINE_VERDICTS = ("psnr", "reward", "judge", REALISM)


def split_headline(metrics: dict) -> tuple[dict, dict]:
    """(metrics/evaluate.json, metrics/evaluate_detail.json). The headline, what `dvc metrics
    show`/`diff` list: `n_test`, the overall SFT and RL rows, and `rl_vs_sft` (per metric the mean
    paired difference RL - SFT and, for `HEADLINE_VERDICTS`, the interval's verdict); the same per
    benchmark. The detail (a plain DVC output) is everything: every row overall (LQ, the
    controls, GT), `higher_is_better`, `sampling`, per task, every row against SFT with its
    interval, overall (`vs_sft`) and per task (`per_task_vs_sft`), and each benchmark's. `merge`
    (pipeline/evaluate_record.py) gives the whole back."""
    headline: dict = {"n_test": metrics["n_test"],
                      "overall": {row: metrics["overall"][row] for row in HEADLINE_ROWS if row in metrics["overall"]}}
    rl = metrics.get("vs_sft", {}).get("rl")
    if rl:
        higher = metrics["higher_is_better"]
        headline["rl_vs_sft"] = {m: {"diff": f["diff"]} | (
            {"verdict": verdict(f, higher[m])} if m in HEADLINE_VERDICTS else {}) for m, f in rl.items()}
    detail = {k: v for k, v in metrics.items() if k != "benchmarks"}
    if metrics.get("benchmarks"):
        parts = {name: split_headline(block) for name, block in metrics["benchmarks"].items()}
        headline["benchmarks"] = {name: h | {"path": metrics["benchmarks"][name]["path"]} for name, (h, _) in parts.items()}
        detail["benchmarks"] = {name: d for name, (_, d) in parts.items()}
    return headline, detail


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
