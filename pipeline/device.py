"""Device choice, precision and CPU thread count, set once per stage from `runtime`."""

from __future__ import annotations

import contextlib
import random
from typing import Callable

import numpy as np
import torch

from pipeline.config import NO_CUDA, ConfigError, RuntimeConfig

# The autocast dtype of restorer forward passes (runtime.precision), per process like the
# thread count: set by setup_runtime, read by autocast.
_precision = {"value": "auto"}


def setup_runtime(cfg: RuntimeConfig) -> torch.device:
    """Set threads, seeds and precision; return CUDA when present (or asked for), else CPU."""
    # Explicit threads: two busy threads next to another process slowed elementwise ops 20x.
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    _precision["value"] = cfg.precision
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """None: full precision. auto: bf16 on CUDA, fp32 on CPU (bf16 is slower there)."""
    choice = _precision["value"]
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def autocast(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training (a pass-through for any other precision)."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                      grad_clip: float, scaler: torch.amp.GradScaler,
                      reduce_grads: Callable[[list[torch.nn.Parameter]], None] | None = None) -> None:
    """Back-propagate `loss`, clip the gradient norm of `params` and step (through `scaler`,
    which skips a step whose fp16 gradients overflowed and lowers its scale).

    `reduce_grads`: called on `params` right after backward, before unscaling and clipping
    (pipeline.distributed.average_gradients: every rank then clips and steps on the averaged
    gradients, and an fp16 overflow on any rank reaches all of them)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if reduce_grads is not None:
        reduce_grads(params)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
