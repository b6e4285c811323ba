"""pyiqa metrics by name, batched, on [-1, 1] tensors; higher-is-better known per metric."""

from __future__ import annotations

from functools import lru_cache

import torch


class MetricError(ValueError):
    pass


@lru_cache(maxsize=None)
def metric(name: str, device: str = "cpu"):
    import pyiqa

    try:
        return pyiqa.create_metric(name, device=torch.device(device), as_loss=False)
    except Exception as err:  # pyiqa raises assorted errors for unknown names / missing weights
        raise MetricError(f"pyiqa metric '{name}' is not available offline here: {err}") from None


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
