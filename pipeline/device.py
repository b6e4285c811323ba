"""Device choice and CPU thread count, set once per stage from `runtime`."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from pipeline.config import ConfigError, RuntimeConfig


def setup_runtime(cfg: RuntimeConfig) -> torch.device:
    """Set threads and seeds; return CUDA when present (or asked for), else CPU."""
    # Explicit threads: two busy threads next to another process slowed elementwise ops 20x.
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is 'cuda' but torch sees no CUDA device here; use auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (bf16 is slower there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
