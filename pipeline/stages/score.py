"""`score`: how hard each training sample is for the SFT model, in reward terms.

Each scored training patch (a seeded subset of `score.samples`) is restored once, the way RL
rolls out (`rl.steps`, `rl.eta`), and gets: the reward of the output and of its GT (the RL
reward, `rl.reward`), SSIM and PSNR against the GT, and its difficulty
r(GT) - r(output) + score.fidelity_weight * (1 - SSIM). The RL stage draws its images from
this table and seeds its running difficulty statistics with it.
Output: `data/difficulty.csv`, `metrics/score.json`, `plots/difficulty_hist.png`, an MLflow run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline import iqa, tracking
from pipeline.atomic import atomic_file
from pipeline.config import Params
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.data.sources import DataError
from pipeline.device import setup_runtime
from pipeline.models.restorer import DiffusionRestorer
from pipeline.paths import Paths
from pipeline.rewards.scorers import Reward, build_reward
from pipeline.rl.difficulty import sample_difficulty

SECTIONS = ["score", "rl"]
COLUMNS = ["index", "id", "task", "reward_output", "reward_gt", "reward_gap", "ssim", "psnr", "difficulty"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.score, Paths(root)
    device = setup_runtime(params.runtime)
    train = load_split(paths.data, "train")
    generator = torch.Generator().manual_seed(params.runtime.seed)
    picked = scored_subset(len(train), cfg.samples, generator)
    model = DiffusionRestorer.from_pretrained(paths.sft_model).to(device).eval()
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
            tmp.write_text(json.dumps(summary, indent=2))
        save_histogram(paths.plots / "difficulty_hist.png", rows, cfg.bins)
        mlflow.log_metrics(tracking.flatten(summary))
        for path in (paths.difficulty_table, paths.metrics / "score.json", paths.plots / "difficulty_hist.png"):
            mlflow.log_artifact(str(path))
    print(f"score: {len(rows)} training patches; difficulty quantiles {summary['difficulty']}, "
          f"mean reward gap {summary['mean']['reward_gap']:.4g}")
    return summary


def load_reward(params: Params, paths: Paths, device: torch.device) -> Reward:
    """The RL reward (`rl.reward`); `learned` is the reward stage's model in checkpoints/reward."""
    weights_dir = Path(params.storage.weights_dir) if params.storage.weights_dir else None
    return build_reward(params.rl.reward, device, learned_path=paths.reward_model, weights_dir=weights_dir)


def scored_subset(n: int, samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the training patches to score: a seeded subset, or all."""
    if samples is None or samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:samples].sort().values


def measure(reward: Reward, images: torch.Tensor, gt: torch.Tensor, fidelity_weight: float) -> dict[str, torch.Tensor]:
    """Per-image reward of the output and of the GT, SSIM, PSNR and the difficulty (all on CPU)."""
    with torch.no_grad():
        r_out, r_gt = reward(images, gt).cpu(), reward(gt, gt).cpu()
    ssim, psnr = iqa.score("ssim", images, gt), iqa.score("psnr", images, gt)
    return {"reward_output": r_out, "reward_gt": r_gt, "reward_gap": r_gt - r_out, "ssim": ssim, "psnr": psnr,
            "difficulty": sample_difficulty(r_gt, r_out, ssim, fidelity_weight)}


def write_table(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def read_table(path: Path, train: PairedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(training-split indices, difficulties) of the scored samples; checked against the split."""
    if not Path(path).exists():
        raise DataError(f"{path}: not found; run the score stage first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"{path}: no rows or missing columns {missing}; run the score stage again")
    index, difficulty = [], []
    for n, row in enumerate(rows, start=2):
        try:
            i, d = int(row["index"]), float(row["difficulty"])
        except ValueError:
            raise DataError(f"{path}, line {n}: index/difficulty are not numbers") from None
        if not 0 <= i < len(train) or train.samples[i]["id"] != row["id"]:
            raise DataError(f"{path}, line {n}: sample {row['id']!r} is not training patch {i} of "
                            "data/prepared; the table is stale, run the score stage again")
        if not math.isfinite(d):
            raise DataError(f"{path}, line {n}: difficulty is {d}")
        index.append(i)
        difficulty.append(d)
    return torch.tensor(index), torch.tensor(difficulty)


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
