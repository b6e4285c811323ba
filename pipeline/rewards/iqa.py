"""Image-quality metrics: pyiqa's by name (created offline, batched, on [-1, 1] tensors), and
the plain PSNR that training code compares outputs with.

Every pyiqa metric restorl uses is created here, so a metric that is unknown or whose weights
are not in the local cache fails the same way everywhere: a `MetricError` naming it and the
directory its weights were looked for in. Nothing is downloaded.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import UserError


class MetricError(UserError, ValueError):
    pass


def create_metric(name: str, device: torch.device | str = "cpu", as_loss: bool = False,
                  weights_dir: Path | None = None):
    """A new pyiqa metric; `weights_dir`: where its weights lie (pyiqa looks under
    $TORCH_HOME/hub/pyiqa; filled by `restorl weights sync`, never downloaded)."""
    import pyiqa

    if weights_dir is not None:
        os.environ.setdefault("TORCH_HOME", str(weights_dir))
    try:
        return pyiqa.create_metric(name, device=torch.device(device), as_loss=as_loss)
    except Exception as err:  # pyiqa raises assorted errors for unknown names / missing weights
        where = weights_dir or os.environ.get("TORCH_HOME", "~/.cache/torch")
        raise MetricError(f"pyiqa metric '{name}' is not available offline here (weights looked for "
                          f"under {where}): {err}") from None


@lru_cache(maxsize=None)
def metric(name: str, device: str = "cpu"):
    """The shared evaluation instance of a pyiqa metric (no gradient)."""
    return create_metric(name, device)


def score(name: str, image: torch.Tensor, reference: torch.Tensor | None = None,
          batch_size: int = 256) -> torch.Tensor:
    """Per-image scores; `image`/`reference` are (N, 3, H, W) in [-1, 1]."""
    m = metric(name, str(image.device))
    out = []
    for i in range(0, len(image), batch_size):
        x = ((image[i:i + batch_size] + 1) / 2).clamp(0, 1)
        args = (x,) if reference is None else (x, ((reference[i:i + batch_size] + 1) / 2).clamp(0, 1))
        with torch.no_grad():
            out.append(m(*args).reshape(-1).float().cpu())
    scores = torch.cat(out)
    if not torch.isfinite(scores).all():
        raise MetricError(f"pyiqa metric '{name}' returned non-finite scores")
    return scores


def lower_is_better(name: str) -> bool:
    return bool(metric(name).lower_better)


def needs_reference(name: str) -> bool:
    """pyiqa marks full-reference metrics with metric_mode "FR"."""
    return getattr(metric(name), "metric_mode", "NR") == "FR"


def psnr(images: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, 3, H, W) images in [-1, 1] (peak-to-peak 2)."""
    return -10 * torch.log10(((images - gt) ** 2).mean(dim=(1, 2, 3)) / 4 + 1e-12)
