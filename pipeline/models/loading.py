"""Which restorer a stage works with, and where its weights come from.

- `model_for_sft`: a new pixel UNet (`model.pretrained: null`), or the diffusers folder at
  `model.pretrained` (a local path or an s3:// prefix, mirrored into `.restorl/pretrained/`),
  with a fresh LoRA adapter when `model.lora` is set.
- `load_restorer`: a restorl checkpoint (checkpoints/sft, checkpoints/rl, a registered model):
  a self-contained folder, or adapters whose base is fetched, checked against its recorded hash
  and merged.
- `model_for_rl`: the SFT checkpoint, with a fresh adapter for RL under LoRA (the SFT adapter is
  merged, so switching RL's adapter off gives exactly the SFT model: the reference).

The layout of a folder is read from it: restorl.json's `layout` (pixel when absent), else
model_index.json's pipeline class, else a lone `unet/` is a pixel model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.checkpoint import file_hash
from pipeline.config import ConfigError, ModelConfig, StorageConfig
from pipeline.models import lora
from pipeline.models.latent import LatentRestorer, LdmSrRestorer, SdUpscaleRestorer
from pipeline.models.restorer import META_FILE, PixelRestorer, Restorer

LAYOUTS: dict[str, type[Restorer]] = {"pixel": PixelRestorer, "ldm_sr": LdmSrRestorer, "sd_upscale": SdUpscaleRestorer}
PIPELINE_LAYOUTS = {"LDMSuperResolutionPipeline": "ldm_sr", "StableDiffusionUpscalePipeline": "sd_upscale"}


def read_meta(folder: Path) -> dict | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None


def folder_layout(folder: Path, wanted: str = "auto") -> str:
    """The layout of a diffusers folder; a ConfigError naming the folder when it has none or
    not the one `model.layout` asks for."""
    meta, index = read_meta(folder), Path(folder) / "model_index.json"
    if meta is not None:
        found = meta.get("layout", "pixel")
    elif index.exists():
        pipeline = json.loads(index.read_text()).get("_class_name")
        if pipeline not in PIPELINE_LAYOUTS:
            raise ConfigError(f"model.pretrained: {folder} holds a {pipeline}; restorl restores with "
                              f"{sorted(PIPELINE_LAYOUTS)} folders or a pixel UNet (unet/ + scheduler/)")
        found = PIPELINE_LAYOUTS[pipeline]
    elif (Path(folder) / "unet" / "config.json").exists():
        found = "pixel"
    else:
        raise ConfigError(f"model.pretrained: {folder} is not a diffusers folder (no {META_FILE}, model_index.json "
                          f"or unet/config.json)")
    if wanted not in ("auto", found):
        raise ConfigError(f"model.layout is {wanted}, but {folder} holds a {found} model")
    return found


def load_folder(folder: Path, layout: str, defaults: dict, overrides: dict | None = None) -> Restorer:
    """A self-contained folder of `layout`. Its settings (residual, signal_scale, prompt,
    noise_level): `overrides`, else restorl.json's, else `defaults`."""
    try:
        return LAYOUTS[layout].from_folder(Path(folder), defaults | (read_meta(folder) or {}) | (overrides or {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: cannot load it as a {layout} model: {err}") from None


def fetch(uri: str, storage: StorageConfig | None, cache: Path) -> Path:
    """The local folder of a base: the path itself, or an s3:// prefix mirrored under `cache`."""
    if uri.startswith("s3://"):
        from pipeline.storage import endpoint_url, mirror_prefix

        dest = Path(cache) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        mirror_prefix(uri, dest, endpoint_url(storage))
        return dest
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {uri} is not a folder (or an s3:// prefix)")
    return folder


def load_pretrained(cfg: ModelConfig, storage: StorageConfig | None, cache: Path) -> Restorer:
    folder = fetch(cfg.pretrained, storage, cache)
    # A plain pixel folder does not say what it diffuses: `model:` does. The prompt and noise
    # level are this run's choice, whatever the folder was trained with.
    model = load_folder(folder, folder_layout(folder, cfg.layout),
                        {"residual": cfg.residual, "signal_scale": cfg.signal_scale},
                        {"prompt": cfg.prompt, "noise_level": cfg.noise_level})
    model.base = {"uri": cfg.pretrained, "hash": file_hash(folder)}
    return model


def load_restorer(path: Path, storage: StorageConfig | None = None,
                  cache: Path = Path(".restorl/pretrained")) -> Restorer:
    """A restorl checkpoint, its adapters (if any) merged into their base."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path}: not a restorl checkpoint (no {META_FILE})")
    if not meta.get("adapters"):
        model = load_folder(path, folder_layout(path), {})
        model.base = meta.get("base")  # the pretrained folder it was fine-tuned from, if any
        return model
    base = meta["base"]
    folder = fetch(base["uri"], storage, cache)
    found = file_hash(folder)
    if found != base["hash"]:
        raise ConfigError(f"{path}: its adapters were trained on {base['uri']} with hash {base['hash']}, "
                          f"which now has hash {found}; restore that base or retrain")
    settings = {k: meta[k] for k in ("prompt", "noise_level", "lq_scale") if k in meta}
    model = load_folder(folder, folder_layout(folder), {}, settings)
    lora.load_adapters(model, meta["adapters"], Path(path))
    model.base = base
    return model


def _prepare_training(model: Restorer, cfg: ModelConfig, adapter: str) -> Restorer:
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if cfg.lora is not None:
        lora.attach(model, cfg.lora, adapter)
    return model


def model_for_sft(cfg: ModelConfig, tasks: list[str] | None, storage: StorageConfig | None, cache: Path,
                  lq_scale: int = 1) -> Restorer:
    """The model SFT starts from; `lq_scale`: how much smaller the prepared LQ is than the GT."""
    model = PixelRestorer.build(cfg, tasks) if cfg.pretrained is None else load_pretrained(cfg, storage, cache)
    if lq_scale != 1:
        if not isinstance(model, LatentRestorer) or lq_scale != model.factor:
            latent = f" or at its latent's size ({model.factor})" if isinstance(model, LatentRestorer) else ""
            raise ConfigError(f"prepare.lq_scale is {lq_scale}: the {model.layout} layout takes the LQ at the GT's "
                              f"size (1){latent}")
        model.lq_scale = lq_scale
    unknown = sorted(set(tasks or []) - set(model.tasks)) if model.tasks else []
    if unknown:
        raise ConfigError(f"model.pretrained: {cfg.pretrained} is conditioned on the tasks {model.tasks}; the "
                          f"prepared data also has {unknown}")
    return _prepare_training(model, cfg, "sft")


def model_for_rl(checkpoint: Path, cfg: ModelConfig, storage: StorageConfig | None, cache: Path) -> Restorer:
    return _prepare_training(load_restorer(checkpoint, storage, cache), cfg, "rl")


def export(checkpoint: Path, out: Path, storage: StorageConfig | None = None,
           cache: Path = Path(".restorl/pretrained")) -> Restorer:
    """A plain diffusers folder with every adapter merged (loadable by the layout's diffusers
    pipeline, or by restorl as a self-contained checkpoint)."""
    from pipeline.atomic import atomic_dir

    model = load_restorer(checkpoint, storage, cache)
    with atomic_dir(Path(out)) as tmp:
        model.save_folder(tmp)
    return model
