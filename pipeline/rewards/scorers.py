"""Rewards: one or more IQA scorers with weights, normalised so that higher is better.

A scorer is a pyiqa metric by name (full-reference ones get the GT, no-reference ones do
not; learned metrics load their weights from a local cache directory, never the internet), or
restorl's own learned reward model (`learned`, trained by the `reward` stage). A composite
reward is the weighted sum of its terms' oriented scores. NaN or inf is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.iqa import MetricError


class RewardError(ValueError):
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
    def __init__(self, name: str, device: torch.device, weights_dir: Path | None = None, as_loss: bool = False):
        import pyiqa

        if weights_dir is not None:
            # pyiqa looks for weights under $TORCH_HOME/hub/pyiqa; filled from S3, never downloaded.
            os.environ.setdefault("TORCH_HOME", str(weights_dir))
        try:
            self.metric = pyiqa.create_metric(name, device=device, as_loss=as_loss)
        except Exception as err:
            where = weights_dir or os.environ.get("TORCH_HOME", "~/.cache/torch")
            raise MetricError(f"pyiqa metric '{name}' could not be created offline (weights looked for "
                              f"under {where}): {err}") from None
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
                 weights_dir: Path | None = None) -> Reward:
    """`weights`: scorer name -> weight; `learned` is the reward stage's model at `learned_path`."""
    terms = []
    for name, weight in weights.items():
        if name == "learned":
            if learned_path is None or not Path(learned_path).exists():
                raise RewardError(f"reward term 'learned' needs the reward model at {learned_path}; "
                                  "run the reward stage first")
            scorer: Scorer = LearnedScorer(Path(learned_path), device)
        else:
            scorer = PyiqaScorer(name, device, weights_dir)
        terms.append(Term(name, weight, scorer))
    return Reward(terms)
