"""The prepared patches of one split, loaded whole into memory as [-1, 1] tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.sources import DataError


@dataclass
class PairedSplit:
    gt: torch.Tensor  # (N, 3, P, P) in [-1, 1]
    lq: torch.Tensor
    samples: list[dict]  # manifest entries, same order

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tasks(self) -> list[str]:
        return [s["task"] for s in self.samples]

    @property
    def lq_scale(self) -> int:
        """How much smaller the LQ is than the GT (prepare.lq_scale; 1: the same size)."""
        return self.gt.shape[-1] // self.lq.shape[-1]

    @property
    def lq_full(self) -> torch.Tensor:
        """The LQ at the GT's size, for what compares it with the GT (metrics, loss weights,
        the reward's negatives): bicubic from a smaller LQ, the LQ itself otherwise."""
        if self.lq_scale == 1:
            return self.lq
        return F.interpolate(self.lq, size=self.gt.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _tensor(path: Path) -> torch.Tensor:
    return to_tensor(np.asarray(Image.open(path).convert("RGB")))


def load_split(data_dir: Path, split: str) -> PairedSplit:
    data_dir = Path(data_dir)
    samples = [s for s in read_manifest(data_dir)["samples"] if s["split"] == split]
    if not samples:
        raise DataError(f"{data_dir}/manifest.json: no samples in split '{split}'")
    gt = torch.stack([_tensor(data_dir / s["gt"]) for s in samples])
    lq = torch.stack([_tensor(data_dir / s["lq"]) for s in samples])
    return PairedSplit(gt, lq, samples)


def random_dihedral(gt: torch.Tensor, lq: torch.Tensor, generator: torch.Generator):
    """The same random flip/rotation (one of 8) for each GT/LQ pair."""
    k, flip = torch.randint(0, 4, (1,), generator=generator).item(), torch.rand(1, generator=generator).item() < 0.5
    gt, lq = torch.rot90(gt, k, (2, 3)), torch.rot90(lq, k, (2, 3))
    if flip:
        gt, lq = gt.flip(3), lq.flip(3)
    return gt, lq


def sample_weights(kind: str, data: PairedSplit) -> torch.Tensor:
    """Loss weight of each training sample: 1, or 1 / its task's mean LQ error (mean weight 1)."""
    if kind == "mse":
        return torch.ones(len(data))
    lq_error = ((data.gt - data.lq_full) ** 2).mean(dim=(1, 2, 3))
    tasks = data.tasks
    task_error = {t: lq_error[[i for i, x in enumerate(tasks) if x == t]].mean() for t in set(tasks)}
    weights = torch.stack([1.0 / (task_error[t] + 1e-6) for t in tasks])
    return weights / weights.mean()
