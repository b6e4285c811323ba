"""The difficulty table (data/difficulty.csv): one row per scored training patch.

Written by the `score` stage, read by `rl` as its pool of images and the seed of its running
difficulty statistics; `measure` is the one definition of a row's figures, used both to fill
the table and to refresh difficulties from RL's rollouts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from pipeline.atomic import atomic_file
from pipeline.data.dataset import PairedSplit
from pipeline.data.sources import DataError
from pipeline.rewards import iqa
from pipeline.rewards.scorers import Reward
from pipeline.rl.difficulty import sample_difficulty

COLUMNS = ["index", "id", "task", "reward_output", "reward_gt", "reward_gap", "ssim", "psnr", "difficulty"]


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
