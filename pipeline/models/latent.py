"""Latent layouts: pretrained latent-diffusion super-resolution models behind the `Restorer` interface.

Both diffuse an autoencoder's latent of the GT and condition the UNet on the LQ image at the
latent's size (concatenated channel-wise), as diffusers' pipelines of the same name do:

- `LdmSrRestorer`: `LDMSuperResolutionPipeline` folders (`unet`: UNet2DModel over
  concat(latent, LQ), `vqvae`: VQModel, `scheduler`), e.g. the 4x OpenImages LDM;
- `SdUpscaleRestorer`: `StableDiffusionUpscalePipeline` folders (`unet`: UNet2DConditionModel
  over concat(latent, noised LQ) with the noise level as class label and text embeddings,
  `vae`: AutoencoderKL, `low_res_scheduler`, text encoder and tokenizer).

The autoencoder is frozen: SFT's loss is in latent space, every reward and metric sees decoded
images, and reward feedback back-propagates through the decoder into the UNet. restorl's LQ
patches have the GT's size, and the UNet gets them area-downsampled to the latent's size; or,
with `prepare.lq_scale` equal to the autoencoder's factor, they already have the latent's size
(`lq_scale` in restorl.json) and the output is that many times larger.

A checkpoint is the diffusers folder of the pipeline (loadable by the pipeline class) plus
restorl.json: the frozen parts are copied from the folder the model was loaded from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.models.restorer import META_FILE, Restorer, unet2d_encoder_features


class LatentRestorer(Restorer):
    """What both latent layouts share: a frozen autoencoder, the LQ at the latent's size, and a
    checkpoint that is the source pipeline folder with the trained UNet."""

    unet_folder = "unet"

    def __init__(self, unet, scheduler, autoencoder: torch.nn.Module, source: Path, lq_scale: int = 1):
        super().__init__(unet, scheduler)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.source = Path(source)  # the folder the frozen parts are copied from when saving
        self.factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        self.lq_scale = lq_scale  # 1: the LQ has the output's size; factor: the latent's

    def meta(self) -> dict:
        return super().meta() | {"lq_scale": self.lq_scale}

    def latent_lq(self, lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return lq if tuple(lq.shape[-2:]) == size else F.interpolate(lq, size=size, mode="area")

    def latent_size(self, lq: torch.Tensor) -> tuple[int, int]:
        h, w = lq.shape[-2:]
        if self.lq_scale == self.factor:
            return h, w
        if h % self.factor or w % self.factor:
            raise ConfigError(f"prepare.patch_size: the {self.layout} layout needs image sides that are multiples "
                              f"of {self.factor} (its autoencoder's downscale factor); got {h}x{w}")
        return h // self.factor, w // self.factor

    def noise_shape(self, lq: torch.Tensor) -> tuple[int, ...]:
        return (lq.shape[0], self.autoencoder.config.latent_channels, *self.latent_size(lq))

    def save_folder(self, path: Path) -> None:
        """The source pipeline folder with this UNet (and restorl.json)."""
        path = Path(path)
        for item in sorted(self.source.iterdir()):
            if item.name in (self.unet_folder, META_FILE) or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, path / item.name)
            else:
                shutil.copy2(item, path / item.name)
        self.unet.save_pretrained(path / self.unet_folder)
        (path / META_FILE).write_text(json.dumps(self.meta()))


class LdmSrRestorer(LatentRestorer):
    layout = "ldm_sr"

    @classmethod
    def from_folder(cls, path: Path, meta: dict) -> LdmSrRestorer:
        from diffusers import LDMSuperResolutionPipeline

        pipe = LDMSuperResolutionPipeline.from_pretrained(path)
        return cls(pipe.unet, pipe.scheduler, pipe.vqvae, path, meta.get("lq_scale", 1))

    def signal(self, gt, lq):
        return self.autoencoder.encode(gt).latents

    def to_image(self, signal, lq):
        return self.autoencoder.decode(signal).sample  # quantises, as the pipeline's decode does

    def model_output(self, x_t, t, lq, labels):
        return self.unet(torch.cat([x_t, self.latent_lq(lq, tuple(x_t.shape[-2:]))], dim=1), t).sample

    def encoder_features(self, images, lq, tasks, blocks=1):
        latent = self.signal(images, lq)
        return unet2d_encoder_features(self.unet, torch.cat([latent, self.latent_lq(lq, tuple(latent.shape[-2:]))],
                                                            dim=1), None, blocks)


class SdUpscaleRestorer(LatentRestorer):
    """The LQ gets the pipeline's noise augmentation at `noise_level`, with one fixed noise draw
    (seed 0, as a generator seeded 0 gives the pipeline), so a policy step is a function of
    (x_t, t, LQ) alone. The prompt is embedded once, without classifier-free guidance."""

    layout = "sd_upscale"

    def __init__(self, unet, scheduler, vae, source: Path, low_res_scheduler, prompt_embeds: torch.Tensor,
                 prompt: str, noise_level: int, lq_scale: int = 1):
        super().__init__(unet, scheduler, vae, source, lq_scale)
        self.low_res_scheduler = low_res_scheduler
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.prompt, self.noise_level = prompt, noise_level

    @classmethod
    def from_folder(cls, path: Path, meta: dict) -> SdUpscaleRestorer:
        from diffusers import StableDiffusionUpscalePipeline

        pipe = StableDiffusionUpscalePipeline.from_pretrained(path)
        if meta["noise_level"] > pipe.config.max_noise_level:
            raise ValueError(f"model.noise_level {meta['noise_level']} exceeds this model's max_noise_level "
                             f"{pipe.config.max_noise_level}")
        with torch.no_grad():
            embeds = pipe.encode_prompt(meta["prompt"], torch.device("cpu"), 1, False)[0]
        return cls(pipe.unet, pipe.scheduler, pipe.vae, path, pipe.low_res_scheduler, embeds,
                   meta["prompt"], meta["noise_level"], meta.get("lq_scale", 1))

    def meta(self) -> dict:
        return super().meta() | {"prompt": self.prompt, "noise_level": self.noise_level}

    def signal(self, gt, lq):
        return self.autoencoder.encode(gt).latent_dist.mode() * self.autoencoder.config.scaling_factor

    def to_image(self, signal, lq):
        return self.autoencoder.decode(signal / self.autoencoder.config.scaling_factor).sample

    def noised_lq(self, lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        small = self.latent_lq(lq, size)
        noise = torch.randn(small.shape, generator=torch.Generator().manual_seed(0)).to(small)
        level = torch.full((small.shape[0],), self.noise_level, dtype=torch.long, device=small.device)
        return self.low_res_scheduler.add_noise(small, noise, level)

    def model_output(self, x_t, t, lq, labels):
        n = x_t.shape[0]
        level = torch.full((n,), self.noise_level, dtype=torch.long, device=x_t.device)
        unet_input = torch.cat([x_t, self.noised_lq(lq, tuple(x_t.shape[-2:]))], dim=1)
        return self.unet(unet_input, t, encoder_hidden_states=self.prompt_embeds.expand(n, -1, -1),
                         class_labels=level).sample
