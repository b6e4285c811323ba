"""Image-quality metrics: pyiqa's by name (created offline, batched, on [-1, 1] tensors), and
the plain PSNR that training code compares outputs with.

Every pyiqa metric restorl uses is created here, reading its weight files from one directory
(`pipeline.storage.pyiqa_cache_dir`: `storage.weights_dir`, else pyiqa's own cache), so a
metric that is unknown or whose weight file is missing fails the same way everywhere: a
`MetricError` naming it (and the file), raised instead of a download. (CLIP's own loader,
used by clipiqa and liqe, is not guarded.)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.storage import pyiqa_cache_dir


class MetricError(UserError, ValueError):
    pass


# pyiqa's cache directory and the downloaders are module globals: metrics are created one at a time.
_PYIQA_CACHE_LOCK = threading.Lock()


@contextmanager
def _pyiqa_reading_from(weights_dir: Path, metric_name: str):
    """While a metric is created: pyiqa looks for its weight files in `weights_dir`, and a
    missing one is a `MetricError` naming it instead of a download.

    pyiqa resolves each of its weight files in `load_file_from_url` as
    `download_util.DEFAULT_CACHE_DIR / <file name of the URL>` (that directory is fixed when pyiqa
    is imported) and downloads a missing one with `download_util.download_url_to_file`. Backbone
    weights that torchvision fetches through torch.hub (into `<torch hub dir>/checkpoints`) are
    refused the same way; timm's, from the Hugging Face cache, are read offline.
    """
    import huggingface_hub.constants
    from pyiqa.utils import download_util

    def refuse_download(url: str, dst: str, *args, **kwargs):
        if Path(dst).resolve().parent == weights_dir:
            hint = ("put it under storage.weights_uri and run `restorl weights sync`, or copy it "
                    f"into {weights_dir} (storage.weights_dir)")
        else:
            hint = "copy it there (torch.hub's cache, not filled by `restorl weights sync`)"
        raise MetricError(f"pyiqa metric '{metric_name}' needs the weight file {dst}, which is missing; "
                          f"{hint}. Nothing is downloaded.")

    swaps = [(download_util, "DEFAULT_CACHE_DIR", str(weights_dir)),
             (download_util, "download_url_to_file", refuse_download),
             (torch.hub, "download_url_to_file", refuse_download),
             (huggingface_hub.constants, "HF_HUB_OFFLINE", True)]
    with _PYIQA_CACHE_LOCK:
        saved = [(module, attribute, getattr(module, attribute)) for module, attribute, _ in swaps]
        try:
            for module, attribute, value in swaps:
                setattr(module, attribute, value)
            yield
        finally:
            for module, attribute, value in saved:
                setattr(module, attribute, value)


def create_metric(name: str, device: torch.device | str = "cpu", as_loss: bool = False,
                  weights_dir: Path | None = None):
    """A new pyiqa metric whose weight files are read from `weights_dir` (None: pyiqa's own
    cache); a missing file is a `MetricError` naming it, never a download."""
    import pyiqa

    weights_dir = Path(weights_dir or pyiqa_cache_dir()).expanduser().resolve()
    pyiqa_config(name)
    try:
        with _pyiqa_reading_from(weights_dir, name):
            return pyiqa.create_metric(name, device=torch.device(device), as_loss=as_loss)
    except MetricError:
        raise
    except Exception as err:  # pyiqa raises assorted errors for unusable or missing weights
        raise MetricError(f"pyiqa metric '{name}' cannot be created offline (its weight files are read from "
                          f"{weights_dir}, backbones from the torch.hub and Hugging Face caches): "
                          f"{type(err).__name__}: {err}") from None


def pyiqa_config(name: str) -> dict:
    """pyiqa's settings of a metric (metric_mode, lower_better, ...); unknown names are an error."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    if name not in DEFAULT_CONFIGS:
        raise MetricError(f"'{name}' is not a pyiqa metric (see pyiqa.list_models())")
    return DEFAULT_CONFIGS[name]


@lru_cache(maxsize=None)
def metric(name: str, device: str = "cpu", weights_dir: Path | None = None):
    """The shared evaluation instance of a pyiqa metric (no gradient)."""
    return create_metric(name, device, weights_dir=weights_dir)


def score(name: str, image: torch.Tensor, reference: torch.Tensor | None = None,
          batch_size: int = 256, weights_dir: Path | None = None) -> torch.Tensor:
    """Per-image scores; `image`/`reference` are (N, 3, H, W) in [-1, 1]; `weights_dir`: see
    `create_metric`."""
    m = metric(name, str(image.device), weights_dir)
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
    return bool(pyiqa_config(name).get("lower_better", False))


def needs_reference(name: str) -> bool:
    """pyiqa marks full-reference metrics with metric_mode "FR"."""
    return pyiqa_config(name).get("metric_mode", "NR") == "FR"


def psnr(images: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, 3, H, W) images in [-1, 1] (peak-to-peak 2)."""
    return -10 * torch.log10(((images - gt) ** 2).mean(dim=(1, 2, 3)) / 4 + 1e-12)
