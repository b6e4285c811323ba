"""LoRA adapters on a restorer's UNet, through peft.

`attach` injects peft LoRA layers the way diffusers' `add_adapter` does (it calls it where the
UNet has it, `UNet2DConditionModel`; peft's `inject_adapter_in_model` otherwise, which is what
`add_adapter` runs) and freezes everything else, so SFT and RL train only the adapters.
`AdaptersOff` is the frozen reference RL compares with: the same network with its adapters
switched off, not a copy of the base. A checkpoint with adapters holds their tensors (one
safetensors file each) and, in restorl.json, the URI and hash of the base they apply to;
loading merges them into the base in order (SFT's, then RL's), and `restorl export` saves the
merged UNet as a plain diffusers folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, LoraConfig

# `model` below is a pipeline.models.restorer.Restorer: its `unet` and its `adapters` (entries
# {name, rank, alpha, target_modules, active, state}, in the order they were attached).


def _tuner_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def attach(model, cfg: LoraConfig, name: str) -> None:
    """Add a fresh adapter `name` (its up-projection starts at zero: the model is unchanged)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    model.unet.requires_grad_(False)
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules))
    try:
        if hasattr(model.unet, "add_adapter"):
            model.unet.add_adapter(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, model.unet, adapter_name=name)
    except ValueError as err:
        raise ConfigError(f"model.lora.target_modules {list(cfg.target_modules)} on this UNet: {err}") from None
    for param_name, param in model.unet.named_parameters():
        param.requires_grad_(f".{name}." in param_name)
    model.adapters.append({"name": name, "rank": cfg.rank, "alpha": cfg.alpha,
                           "target_modules": list(cfg.target_modules), "active": True})


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()
            if "lora_" in k and f".{name}." in k}


def merge(model) -> None:
    """Fold the active adapters into the UNet's weights and remove the LoRA layers; each adapter's
    tensors are kept (for saving the chain again)."""
    for entry in model.adapters:
        if entry.get("active"):
            entry["state"] = adapter_state(model, entry["name"])
            entry["active"] = False
    for name, layer in _tuner_layers(model.unet):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.unet.get_submodule(parent) if parent else model.unet, child, layer.get_base_layer())


def load_adapters(model, entries: list[dict], folder: Path) -> None:
    """Attach, fill and merge the adapters of a checkpoint, in order."""
    for entry in entries:
        attach(model, LoraConfig(rank=entry["rank"], alpha=entry["alpha"], target_modules=entry["target_modules"]),
               entry["name"])
        state = load_file(folder / entry["file"])
        result = model.unet.load_state_dict(state, strict=False)
        expected = set(adapter_state(model, entry["name"]))
        if result.unexpected_keys or expected - set(state):
            raise ValueError(f"{folder / entry['file']}: does not fit the base's UNet "
                             f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(expected - set(state))[:3]})")
        merge(model)


def save_adapters(model, path: Path) -> list[dict]:
    """One safetensors file per adapter in `path`; returns what restorl.json records of each."""
    entries = []
    for entry in model.adapters:
        state = adapter_state(model, entry["name"]) if entry.get("active") else entry["state"]
        file = f"adapter_{entry['name']}.safetensors"
        save_file(state, str(path / file))
        entries.append({k: entry[k] for k in ("name", "rank", "alpha", "target_modules")} | {"file": file})
    return entries


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    layers = [layer for _, layer in _tuner_layers(unet)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff:
    """The model with its adapters switched off, for every method called on it: the frozen
    reference without a second copy of the base in memory."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name: str):
        attr = getattr(self._model, name)
        if not callable(attr) or isinstance(attr, torch.nn.Module):
            return attr

        def call(*args, **kwargs):
            with adapters_disabled(self._model.unet):
                return attr(*args, **kwargs)
        return call
