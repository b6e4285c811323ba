"""`evaluate`: restore the test split and score LQ, each model's output, the hack controls and GT.

Rows: LQ, SFT, RL (when `checkpoints/rl` exists), the hack controls applied to the SFT output
(dither sigma 1/255, unsharp mask, 3x3 blur, contrast x1.05: an RL gain smaller than a
control's is no gain) and GT. Full-reference metrics (PSNR, SSIM by pyiqa) compare with GT;
no-reference metrics (PIQE, and the learned `reward` when `checkpoints/reward` exists) score
each image alone, GT included. Figures are given overall and per degradation task.
Output: `metrics/evaluate.json` (DVC metrics), `plots/eval_grid.png` (LQ | SFT | RL | GT), and
the same in an MLflow run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from pipeline import tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params, flatten
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.models.sampling import restore_split
from pipeline.paths import Paths
from pipeline.rewards import iqa
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.scorers import build_reward
from pipeline.storage import pyiqa_cache_dir

SECTIONS = ["evaluate"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.evaluate, Paths(root)
    device = setup_runtime(params.runtime)
    test = load_split(paths.data, "test")
    with tracking.stage_run("evaluate", params, SECTIONS, root):
        def restored(checkpoint):
            model = load_restorer(checkpoint, params.storage, paths.pretrained).to(device)
            return restore_split(model, test, params, progress=True)

        outputs = {"lq": test.lq_full, "sft": restored(paths.sft_model)}
        if paths.rl_model.exists():
            outputs["rl"] = restored(paths.rl_model)
        shown = dict(outputs)  # the grid: LQ | SFT | RL | GT
        generator = torch.Generator().manual_seed(params.runtime.seed)
        outputs |= {f"sft_{name}": hack(outputs["sft"], generator) for name, hack in HACKS.items()}
        scorers = {}
        if paths.reward_model.exists():
            learned = build_reward({"learned": 1.0}, device, learned_path=paths.reward_model)
            scorers["reward"] = lambda images: learned(images.to(device))
        metrics = score_outputs(outputs, test, cfg.fr_metrics, cfg.nr_metrics, scorers,
                                weights_dir=pyiqa_cache_dir(params.storage))
        metrics["sampling"] = cfg.sampling.model_dump()
        with atomic_file(paths.metrics / "evaluate.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
        save_grid(paths.plots / "eval_grid.png", shown, test, cfg.grid_images)
        mlflow.log_metrics({k: v for k, v in flatten(metrics["overall"]).items()})
        mlflow.log_metrics({f"task.{k}": v for k, v in flatten(metrics["per_task"]).items()})
        mlflow.log_artifact(str(paths.metrics / "evaluate.json"))
        mlflow.log_artifact(str(paths.plots / "eval_grid.png"))
    print(format_table(metrics))
    return metrics


def score_outputs(outputs: dict[str, torch.Tensor], data: PairedSplit, fr_metrics: list[str],
                  nr_metrics: list[str], scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                  weights_dir: Path | None = None) -> dict:
    """Mean of each metric per output row, overall and per task; GT gets the NR metrics.

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

    def means(mask: torch.Tensor) -> dict:
        return {row: {m: round(float(v[mask].mean()), 4) for m, v in scores.items()}
                for row, scores in per_image.items()}

    tasks = np.array(data.tasks)
    return {
        "n_test": len(data),
        "higher_is_better": {m: not iqa.lower_is_better(m) for m in fr_metrics + nr_metrics} | {m: True for m in scorers},
        "overall": means(torch.ones(len(data), dtype=torch.bool)),
        "per_task": {t: {"n": int((tasks == t).sum()), **means(torch.from_numpy(tasks == t))}
                     for t in sorted(set(tasks))},
    }


def save_grid(path: Path, outputs: dict[str, torch.Tensor], data: PairedSplit, n: int, zoom: int = 4) -> None:
    """Rows of LQ | each output | GT, one sample per task in turn, enlarged for viewing."""
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(data.tasks):
        by_task.setdefault(t, []).append(i)
    picks, depth = [], 0
    while len(picks) < min(n, len(data)):
        picks += [ids[depth] for ids in by_task.values() if depth < len(ids)][: n - len(picks)]
        depth += 1
    columns = list(outputs.values()) + [data.gt]
    rows = [torch.cat([col[i] for col in columns], dim=2) for i in picks]
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    grid = np.kron(grid, np.ones((zoom, zoom, 1), np.uint8))
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def format_table(metrics: dict) -> str:
    """Plain-text table: one line per (task, row), one column per metric."""
    names = list(metrics["higher_is_better"])
    arrows = {m: "↑" if up else "↓" for m, up in metrics["higher_is_better"].items()}
    header = f"{'task':<16}{'n':>5}  {'output':<14}" + "".join(f"{m + arrows[m]:>10}" for m in names)
    lines = [header, "-" * len(header)]
    blocks = [("overall", {"n": metrics["n_test"], **metrics["overall"]})] + list(metrics["per_task"].items())
    for task, block in blocks:
        for row, scores in ((k, v) for k, v in block.items() if k != "n"):
            cells = "".join(f"{scores[m]:>10.3f}" if m in scores else f"{'':>10}" for m in names)
            lines.append(f"{task:<16}{block['n']:>5}  {row:<14}{cells}")
    return "\n".join(lines)
