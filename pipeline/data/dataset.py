"""The prepared patches of one split: loaded whole as [-1, 1] tensors (`load_split`, for the
small val/test splits), or read from disk per item (`PatchPairs`, for training: memory does not
grow with the data set), with the training draws (`TrainingDraws`) decided apart from the
reading, so the data does not depend on the number of DataLoader workers or processes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.sources import DataError


class ManifestRows:
    """Rows of a split, one per manifest entry in `samples`."""

    samples: list[dict]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tasks(self) -> list[str]:
        return [s["task"] for s in self.samples]


@dataclass
class PairedSplit(ManifestRows):
    gt: torch.Tensor  # (N, 3, P, P) in [-1, 1]
    lq: torch.Tensor
    samples: list[dict]  # manifest entries, same order

    @property
    def lq_scale(self) -> int:
        """How much smaller the LQ is than the GT (prepare.lq_scale; 1: the same size)."""
        return self.gt.shape[-1] // self.lq.shape[-1]

    @property
    def lq_full(self) -> torch.Tensor:
        """The LQ at the GT's size, for what compares it with the GT (metrics, loss weights,
        the reward's negatives): bicubic from a smaller LQ, the LQ itself otherwise."""
        return at_gt_size(self.lq, self.gt)

    def subset(self, rows: torch.Tensor) -> PairedSplit:
        """The pairs at `rows` (a 1-D index tensor), in that order."""
        return PairedSplit(self.gt[rows], self.lq[rows], [self.samples[i] for i in rows.tolist()])

    def __getitem__(self, row: int) -> dict:
        """One pair as `PatchPairs` gives it, so a split in memory streams through the same DataLoader code."""
        return {"gt": self.gt[row], "lq": self.lq[row], "row": row}


def at_gt_size(lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) LQ patches at their GT's size: bicubic from a smaller LQ, the LQ itself otherwise."""
    if lq.shape[-2:] == gt.shape[-2:]:
        return lq
    return F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


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
    return _task_balanced(data.tasks, [lq_error(data.gt[i], data.lq[i]) for i in range(len(data))])


def lq_error(gt: torch.Tensor, lq: torch.Tensor) -> float:
    """Mean squared error of one (3, H, W) LQ against its GT, a smaller LQ upsampled bicubically first."""
    if lq.shape != gt.shape:
        lq = F.interpolate(lq[None], size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)[0]
    return float(((gt - lq) ** 2).mean())


def _task_balanced(tasks: list[str], errors: list[float]) -> torch.Tensor:
    task_error = {t: torch.tensor([e for e, x in zip(errors, tasks) if x == t]).mean() for t in set(tasks)}
    weights = torch.stack([1.0 / (task_error[t] + 1e-6) for t in tasks])
    return weights / weights.mean()

def dihedral(image: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a (C, H, W) image: code % 4 quarter turns, flipped
    left-right when code >= 4 (code 0: unchanged)."""
    image = torch.rot90(image, code % 4, (1, 2))
    return image.flip(2) if code >= 4 else image


class PatchPairs(ManifestRows, torch.utils.data.Dataset):
    """One split's GT/LQ pairs, each read from its PNGs when asked for.

    An item is asked for by its row, or by a `TrainingDraws` key (row, dihedral code, crop top,
    crop left) that says how to augment it: the same key gives the same pair in any worker."""

    def __init__(self, data_dir: Path, split: str, crop: int | None = None):
        self.root = Path(data_dir)
        self.samples = [s for s in read_manifest(self.root)["samples"] if s["split"] == split]
        if not self.samples:
            raise DataError(f"{self.root}/manifest.json: no samples in split '{split}'")
        self.crop = crop

    @property
    def lq_scale(self) -> int:
        """How much smaller the LQ is than the GT (prepare.lq_scale; 1: the same size)."""
        gt, lq = self.pair(0)
        return gt.shape[-1] // lq.shape[-1]

    def pair(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[row]
        return _tensor(self.root / sample["gt"]), _tensor(self.root / sample["lq"])

    def __getitem__(self, key: int | tuple[int, int, int, int]) -> dict:
        row, code, top, left = key if isinstance(key, tuple) else (key, 0, 0, 0)
        gt, lq = self.pair(row)
        if self.crop:
            scale = gt.shape[-1] // lq.shape[-1]  # prepare.lq_scale: the LQ crop is `scale` times smaller
            gt = gt[:, top:top + self.crop, left:left + self.crop]
            lq = lq[:, top // scale:(top + self.crop) // scale, left // scale:(left + self.crop) // scale]
        return {"gt": dihedral(gt, code), "lq": dihedral(lq, code), "row": row}


class TrainingDraws(torch.utils.data.Sampler):
    """The keys of every training step's batch, drawn from a generator of its own (seeded):
    per row of the global batch of `batch_size`, a patch (with replacement), a dihedral code
    (0 without `augment`) and, with `crop`, the crop's corner (multiples of `scale`, the LQ's
    factor). Each process keeps its `rows` of the global batch. Starting at step `start`
    replays the earlier draws rather than storing them: a resumed run gets the same batches."""

    def __init__(self, size: int, batch_size: int, steps: int, seed: int, *, augment: bool, patch: int,
                 crop: int | None = None, scale: int = 1, rows: slice = slice(None), start: int = 0):
        self.size, self.batch_size, self.steps, self.seed = size, batch_size, steps, seed
        self.augment, self.patch, self.crop, self.scale = augment, patch, crop, scale
        self.rows, self.start = rows, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        generator = torch.Generator().manual_seed(self.seed)
        b = self.batch_size
        for step in range(self.steps):
            rows = torch.randint(0, self.size, (b,), generator=generator)
            codes = torch.randint(0, 8, (b,), generator=generator) if self.augment else torch.zeros(b, dtype=torch.long)
            corners = torch.zeros(2, b, dtype=torch.long)
            if self.crop:
                corners = torch.randint(0, (self.patch - self.crop) // self.scale + 1, (2, b), generator=generator)
                corners *= self.scale
            if step >= self.start:
                keys = list(zip(rows.tolist(), codes.tolist(), corners[0].tolist(), corners[1].tolist()))
                yield keys[self.rows]


def task_weights(kind: str, data: PatchPairs) -> torch.Tensor:
    """`sample_weights` read pair by pair: one weight per row, without loading the split."""
    if kind == "mse":
        return torch.ones(len(data))
    return _task_balanced(data.tasks, [lq_error(*data.pair(row)) for row in range(len(data))])
