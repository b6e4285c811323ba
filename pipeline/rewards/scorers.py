"""Rewards: one or more IQA scorers with weights, normalised so that higher is better.

A scorer is a pyiqa metric by name (full-reference ones get the GT, no-reference ones do
not; learned metrics load their weights from a local cache directory, never the internet), or
restorl's own learned reward model (`learned`, trained by the `reward` stage). A composite
reward is the weighted sum of its terms' oriented scores. NaN or inf is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import UserError
from pipeline.rewards import iqa
from pipeline.storage import pyiqa_cache_dir

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.paths import Paths


class RewardError(UserError, ValueError):
    pass


@dataclass
class Term:
    name: str
    weight: float
    scorer: "Scorer"


class Scorer:
    """Per-image scores of (N, 3, H, W) images in [-1, 1], oriented so that higher is better."""

    name: str
    needs_reference: bool
    differentiable: bool

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class PyiqaScorer(Scorer):
    """A pyiqa metric; `as_loss`: with gradient and one value per image (reward feedback)."""

    def __init__(self, name: str, device: torch.device, weights_dir: Path | None = None, as_loss: bool = False):
        self.metric = iqa.create_metric(name, device, as_loss=as_loss, weights_dir=weights_dir)
        if as_loss:
            # As a loss pyiqa averages over the batch by default; the update needs per-image values.
            self.metric.loss_reduction = "none"
        self.name = name
        self.needs_reference = self.metric.metric_mode == "FR"
        self.differentiable = as_loss
        self.sign = -1.0 if self.metric.lower_better else 1.0

    def __call__(self, images, reference=None):
        x = ((images + 1) / 2).clamp(0, 1)
        args = (x, ((reference + 1) / 2).clamp(0, 1)) if self.needs_reference else (x,)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return self.sign * self.metric(*args).reshape(-1).float()


class LearnedScorer(Scorer):
    """The reward stage's no-reference model (differentiable)."""

    def __init__(self, path: Path, device: torch.device):
        from pipeline.models.reward_model import RewardModel

        self.model = RewardModel.load(path).to(device).eval()
        self.model.requires_grad_(False)
        self.name, self.needs_reference, self.differentiable = "learned", False, True

    def __call__(self, images, reference=None):
        return self.model(images)


class Reward:
    def __init__(self, terms: list[Term]):
        if not terms:
            raise RewardError("a reward needs at least one term")
        self.terms = terms

    @property
    def differentiable(self) -> bool:
        return all(t.scorer.differentiable for t in self.terms)

    def __call__(self, images: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        total = torch.zeros(images.shape[0], device=images.device)
        for term in self.terms:
            if term.scorer.needs_reference and gt is None:
                raise RewardError(f"reward term '{term.name}' is full-reference and needs the GT")
            scores = term.scorer(images, gt)
            if not torch.isfinite(scores).all():
                raise RewardError(f"reward term '{term.name}' returned NaN/inf for "
                                  f"{int((~torch.isfinite(scores)).sum())} image(s)")
            total = total + term.weight * scores
        return total


def build_reward(weights: dict[str, float], device: torch.device, learned_path: Path | None = None,
                 weights_dir: Path | None = None, differentiable: bool = False, probe_size: int = 32) -> Reward:
    """`weights`: scorer name -> weight; `learned` is the reward stage's model at `learned_path`.

    `differentiable`: pyiqa terms are built as losses (with gradient), and every term is probed
    on a `probe_size` batch: one that gives no per-image gradient is an error naming it.
    """
    terms = []
    for name, weight in weights.items():
        if name == "learned":
            if learned_path is None or not Path(learned_path).exists():
                raise RewardError(f"reward term 'learned' needs the reward model at {learned_path}; "
                                  "run the reward stage first")
            scorer: Scorer = LearnedScorer(Path(learned_path), device)
        else:
            scorer = PyiqaScorer(name, device, weights_dir, as_loss=differentiable)
        terms.append(Term(name, weight, scorer))
    if differentiable:
        probe = torch.zeros(2, 3, probe_size, probe_size, device=device, requires_grad=True)
        for term in terms:
            scores = term.scorer(probe, probe.detach() + 0.1)
            if not scores.requires_grad or scores.shape != (2,):
                raise RewardError(f"rl.reward term '{term.name}' gives no per-image gradient; "
                                  "rl.objective: refl needs a differentiable reward")
    return Reward(terms)


def load_reward(params: "Params", paths: "Paths", device: torch.device, differentiable: bool = False) -> Reward:
    """The RL reward (`rl.reward`) of a workspace: `learned` is the reward stage's model in
    checkpoints/reward, pyiqa weights come from `storage.weights_dir` (else pyiqa's cache)."""
    return build_reward(params.rl.reward, device, learned_path=paths.reward_model,
                        weights_dir=pyiqa_cache_dir(params.storage),
                        differentiable=differentiable, probe_size=params.prepare.patch_size)
