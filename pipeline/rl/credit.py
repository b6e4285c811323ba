"""Step credit: per-step advantages from the advantages at the reward checkpoints.

A rollout of S DDIM steps is scored at checkpoints k_1 < ... < k_K = S: the clean image
predicted after k steps (the final image at k = S), each reward normalised within its group
(pipeline/rl/advantages.py). A credit function turns those (K, N) checkpoint advantages into
the (S, N) advantages of the S transitions x_j -> x_{j+1}. The config picks one by name
(`rl.step_credit`); a method with its own step weighting adds a function here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # config validation imports this module; keep diffusers out of it
    from pipeline.rl.rollout import Rollouts


def next_checkpoint(adv: torch.Tensor, checkpoints: list[int], r: "Rollouts") -> torch.Tensor:
    """Transition j first shows in the image predicted after j + 1 steps, so it takes the
    advantage of the first checkpoint k >= j + 1 (the final image's for the last stretch)."""
    steps = len(r.timesteps)
    which = torch.searchsorted(torch.tensor(checkpoints), torch.arange(1, steps + 1))
    return adv[which]


def terminal(adv: torch.Tensor, checkpoints: list[int], r: "Rollouts") -> torch.Tensor:
    """DDPO: every step gets the final image's advantage; other checkpoints are ignored."""
    return adv[-1:].expand(len(r.timesteps), -1)


STEP_CREDIT: dict[str, Callable[[torch.Tensor, list[int], "Rollouts"], torch.Tensor]] = {
    "next_checkpoint": next_checkpoint,
    "terminal": terminal,
}
