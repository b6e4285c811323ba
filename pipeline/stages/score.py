"""`score`: how hard each training sample is for the SFT model, in reward terms.

Each scored training patch (a seeded subset of `score.samples`) is restored once, the way RL
rolls out (`rl.steps`, `rl.eta`), and gets: the reward of the output and of its GT (the RL
reward, `rl.reward`), SSIM and PSNR against the GT, and its difficulty
r(GT) - r(output) + score.fidelity_weight * (1 - SSIM). The RL stage draws its images from
this table and seeds its running difficulty statistics with it.
Output: `data/difficulty.csv`, `metrics/score.json` (count, means, share of GT above the output),
`plots/difficulty_hist.png`, an MLflow run (also the difficulty quantiles and per-task means).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline import tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params, flatten
from pipeline.data.dataset import load_split
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.paths import Paths
from pipeline.rewards.scorers import load_reward
from pipeline.rl.difficulty_table import measure, write_table

SECTIONS = ["score", "rl"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.score, Paths(root)
    device = setup_runtime(params.runtime)
    train = load_split(paths.data, "train")
    generator = torch.Generator().manual_seed(params.runtime.seed)
    picked = scored_subset(len(train), cfg.samples, generator)
    model = load_restorer(paths.sft_model, params.storage, paths.pretrained).to(device).eval()
    reward = load_reward(params, paths, device)

    with tracking.stage_run("score", params, SECTIONS, root):
        rows = []
        for start in tqdm(range(0, len(picked), cfg.batch_size), desc="score", unit="batch"):
            idx = picked[start:start + cfg.batch_size]
            lq, gt = train.lq[idx].to(device), train.gt[idx].to(device)
            tasks = [train.tasks[i] for i in idx.tolist()]
            with torch.no_grad():
                out = model.sample(lq, params.rl.steps, params.rl.eta, generator, tasks=tasks).image
            m = measure(reward, out, gt, cfg.fidelity_weight)
            for j, i in enumerate(idx.tolist()):
                rows.append({"index": i, "id": train.samples[i]["id"], "task": tasks[j]}
                            | {k: float(v[j]) for k, v in m.items()})
        write_table(paths.difficulty_table, rows)
        summary = summarise(rows)
        with atomic_file(paths.metrics / "score.json") as tmp:
            tmp.write_text(json.dumps(headline(summary), indent=2))
        save_histogram(paths.plots / "difficulty_hist.png", rows, cfg.bins)
        mlflow.log_metrics(flatten(summary))
        for path in (paths.difficulty_table, paths.metrics / "score.json", paths.plots / "difficulty_hist.png"):
            mlflow.log_artifact(str(path))
    print(f"score: {len(rows)} training patches; difficulty quantiles {summary['difficulty']}, "
          f"mean reward gap {summary['mean']['reward_gap']:.4g}")
    return summary


def scored_subset(n: int, samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the training patches to score: a seeded subset, or all."""
    if samples is None or samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:samples].sort().values


def summarise(rows: list[dict]) -> dict:
    d = torch.tensor([r["difficulty"] for r in rows])
    qs = torch.quantile(d, torch.tensor([0.1, 0.5, 0.9])).tolist()
    columns = ["reward_output", "reward_gt", "reward_gap", "ssim", "psnr", "difficulty"]
    per_task: dict[str, list[float]] = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(r["difficulty"])
    return {
        "n": len(rows),
        "mean": {c: round(sum(r[c] for r in rows) / len(rows), 6) for c in columns},
        "difficulty": {"q10": round(qs[0], 6), "q50": round(qs[1], 6), "q90": round(qs[2], 6)},
        "gt_above_output": round(sum(r["reward_gap"] > 0 for r in rows) / len(rows), 4),
        "per_task_difficulty": {t: round(sum(v) / len(v), 6) for t, v in sorted(per_task.items())},
    }


HEADLINE = ("n", "mean", "gt_above_output")  # metrics/score.json; the quantiles and per-task means: MLflow only


def headline(summary: dict) -> dict:
    """What metrics/score.json (a DVC metric) keeps of `summarise`'s summary; the difficulty
    quantiles and per-task mean difficulty are logged to the MLflow run (and drawn in
    plots/difficulty_hist.png), not listed by `dvc metrics show`."""
    return {k: summary[k] for k in HEADLINE}


def save_histogram(path: Path, rows: list[dict], bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([r["difficulty"] for r in rows], bins=bins, color="#4470a0")
    ax.set_xlabel("difficulty = r(GT) - r(SFT output) + w (1 - SSIM)")
    ax.set_ylabel("training patches")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
