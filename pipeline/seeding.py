"""Seeds of the restorations: every batch draws its noise from a generator of its own, derived
from the restoration's seed and the batch's index, so a batch's output does not depend on which
batches came before it (streamed, or shared among processes, it is the same image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Seed = int | Sequence[int]


def batch_generator(seed: Seed, index: int) -> torch.Generator:
    """The CPU generator of batch `index` of a restoration seeded `seed` (an int, or ints that
    name a stream of their own, e.g. (runtime.seed, 1)), derived by numpy's SeedSequence."""
    entropy = [*seed, index] if isinstance(seed, Sequence) else [seed, index]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
