"""The conditional diffusion restorer: one interface, one class per model layout.

Every layout diffuses a *signal* and maps it to an image: the pixel layout (`PixelRestorer`,
what restorl builds) diffuses the image itself or the residual GT - LQ; the latent layouts
(pipeline/models/latent.py) diffuse an autoencoder's latent. The RL loop, the stages and the
rewards talk only to the interface `Restorer` defines:

- `step(x_t, t, lq, eta)` -> mean, std and x0-hat (an image) of one DDIM step: the policy;
- `sample(lq, steps, eta)` / `restore(...)`: DDIM sampling from noise;
- `sft_loss(gt, lq)`: the per-sample denoising loss;
- `reference()`: the frozen model KL and regularizers compare with.

A layout implements four hooks: `signal` (image -> diffused signal), `to_image` (signal ->
image), `noise_shape` and `model_output` (one network call), plus its folder I/O
(`from_folder`, `save_folder`). docs/layouts.md describes them.

Training noise comes from a DDPM scheduler, sampling uses DDIM with the same betas and
`trailing` spacing. Images live in [-1, 1].
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from pipeline.config import ConfigError, ModelConfig
from pipeline.device import autocast
from pipeline.models import lora

META_FILE = "restorl.json"


@dataclass
class StepOutput:
    mean: torch.Tensor  # mean of x_prev given x_t: the policy's action mean
    std: float  # its standard deviation (0 for deterministic DDIM and for the last step)
    x0: torch.Tensor  # predicted clean *image* (not residual, not latent), in [-1, 1] space


@dataclass
class SampleOutput:
    image: torch.Tensor  # restored image in [-1, 1]
    # With keep_trajectory: x_t at every step (len steps + 1), and each step's output.
    latents: list[torch.Tensor] = field(default_factory=list)
    steps: list[StepOutput] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)


def sampling_scheduler(config) -> DDIMScheduler:
    """DDIM with the training betas. `trailing` spacing starts sampling at the last training
    step (pure noise) and ends with a step to alpha=1, whose std is 0: the deterministic final step."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


class Restorer(torch.nn.Module):
    """What every layout shares: DDIM policy steps, sampling, the SFT loss, the reference."""

    layout: str = ""

    def __init__(self, unet: torch.nn.Module, scheduler: DDPMScheduler, tasks: list[str] | None = None):
        super().__init__()
        self.unet = unet
        self.tasks = list(tasks) if tasks else None  # class-label vocabulary when task-conditioned
        # Training noise: DDPM with the model's betas and prediction type.
        plain_ddpm = type(scheduler) is DDPMScheduler and not scheduler.config.clip_sample
        self.train_scheduler = scheduler if plain_ddpm else DDPMScheduler.from_config(scheduler.config,
                                                                                      clip_sample=False)
        self.sample_scheduler = sampling_scheduler(scheduler.config)
        # Set by pipeline.models.lora: the base this model was loaded from and its adapters.
        self.base: dict | None = None
        self.adapters: list[dict] = []

    # ------------------------------------------------------------------ layout hooks

    def signal(self, gt: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The diffused signal of a clean image."""
        raise NotImplementedError

    def to_image(self, signal: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The image of a (predicted) signal."""
        raise NotImplementedError

    def noise_shape(self, lq: torch.Tensor) -> tuple[int, ...]:
        """Shape of x_T for a batch of LQ images."""
        raise NotImplementedError

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, lq: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
        """The network's prediction (the scheduler's `prediction_type`) at x_t, t."""
        raise NotImplementedError

    def save_folder(self, path: Path) -> None:
        """A self-contained folder: the diffusers folders and restorl.json."""
        raise NotImplementedError

    def save_pretrained(self, path: Path) -> None:
        """The checkpoint: a self-contained folder, or with adapters, the adapters and a pointer
        to (and hash of) the base they apply to (pipeline/models/lora.py)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        if self.adapters:
            entries = lora.save_adapters(self, Path(path))
            (Path(path) / META_FILE).write_text(json.dumps(self.meta() | {"layout": self.layout, "adapters": entries}))
        else:
            self.save_folder(Path(path))

    def meta(self) -> dict:
        """What restorl.json records beyond the diffusers folders (and the base, when there is one)."""
        return {"layout": self.layout, "tasks": self.tasks} | self._base_meta()

    def _base_meta(self) -> dict:
        return {"base": self.base} if self.base else {}

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What SFT and RL optimise: the UNet, or only its adapters under LoRA."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable tensors (RL keeps the best epoch's)."""
        return {k: v.detach().cpu().clone() for k, v in self.unet.named_parameters() if v.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        result = self.unet.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"unknown tensors for this restorer: {result.unexpected_keys[:5]}")

    def reference(self) -> Restorer:
        """The frozen SFT model KL and regularizers compare with: with adapters, this model with
        its adapters switched off (no copy); without, a frozen copy."""
        if self.adapters and self.adapters[-1].get("active"):
            return lora.AdaptersOff(self)
        ref = copy.deepcopy(self).eval()
        ref.requires_grad_(False)
        return ref

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ model

    def task_labels(self, tasks: list[str] | None, n: int) -> torch.Tensor | None:
        """Class labels for a batch of task names (None for an unconditioned model)."""
        if self.tasks is None:
            return None
        if tasks is None:
            raise ValueError(f"this restorer is task-conditioned; name the task of each image (one of {self.tasks})")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise ValueError(f"task(s) {unknown} unknown to this restorer; it knows {self.tasks}")
        if len(tasks) != n:
            raise ValueError(f"{len(tasks)} task names for a batch of {n}")
        return torch.tensor([self.tasks.index(t) for t in tasks], device=self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor,
                tasks: list[str] | None = None) -> torch.Tensor:
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        labels = self.task_labels(tasks, x_t.shape[0])
        with autocast(x_t.device):
            out = self.model_output(x_t, t, cond, labels)
        return out.float()

    def sft_loss(self, gt: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                 tasks: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Per-sample denoising loss (B,) for the configured prediction target (mean over the signal).

        `shard` (rank, world): `gt` and `cond` are rows rank*B..(rank+1)*B of a global batch of
        world*B rows (pipeline/distributed.py). The noise and timesteps are drawn for the whole
        global batch, the same draws on every rank and in one process, and this shard's rows kept."""
        with torch.no_grad():
            x0 = self.signal(gt, cond)
        rank, world = shard
        n = x0.shape[0]
        mine = slice(rank * n, (rank + 1) * n)
        noise = torch.randn((n * world, *x0.shape[1:]), generator=generator, device="cpu")[mine].to(x0.device)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n * world,),
                          generator=generator, device="cpu")[mine].to(x0.device)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        kind = self.train_scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = self.train_scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(self.predict(x_t, t, cond, tasks), target, reduction="none").mean(dim=(1, 2, 3))

    # ------------------------------------------------------------------ sampling

    def timesteps(self, steps: int) -> list[int]:
        self.sample_scheduler.set_timesteps(steps)
        return [int(t) for t in self.sample_scheduler.timesteps]

    def step_std(self, t: int, eta: float) -> float:
        """sigma_t of the DDIM step from t (DDIM paper, eq. 16, scaled by eta)."""
        s = self.sample_scheduler
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[prev_t]) if prev_t >= 0 else float(s.final_alpha_cumprod)
        return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))

    def step(self, x_t: torch.Tensor, t: int, cond: torch.Tensor, eta: float,
             tasks: list[str] | None = None, decode: bool = True) -> StepOutput:
        """One DDIM step as a Gaussian policy: x_prev ~ N(mean, std^2 I). `decode=False` skips
        the x0-hat image (a latent layout's decoder pass) when only the mean is needed.

        `timesteps(steps)` must have been called for the schedule `t` belongs to.
        """
        out = self.predict(x_t, t, cond, tasks)
        # With zero variance noise, DDIM's prev_sample is exactly the Gaussian's mean.
        res = self.sample_scheduler.step(out, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t))
        x0 = self.to_image(res.pred_original_sample, cond) if decode else res.pred_original_sample
        return StepOutput(res.prev_sample, self.step_std(t, eta), x0)

    def sample(self, cond: torch.Tensor, steps: int, eta: float = 0.0,
               generator: torch.Generator | None = None, keep_trajectory: bool = False,
               grad_last_k: int = 0, tasks: list[str] | None = None,
               shard: tuple[int, int] = (0, 1)) -> SampleOutput:
        """DDIM sampling from pure noise; gradients flow only through the last `grad_last_k` steps.

        `shard` (rank, world): `cond` holds rows rank*B..(rank+1)*B of a global batch of world*B
        rows (pipeline/distributed.py); each noise draw is the global batch's, the same on every
        rank and in one process, and this shard's rows kept."""
        rank, world = shard
        n = cond.shape[0]

        def noise(shape: tuple[int, ...]) -> torch.Tensor:
            drawn = torch.randn((n * world, *shape[1:]), generator=generator, device="cpu")
            return drawn[rank * n:(rank + 1) * n].to(cond.device)

        x = noise(self.noise_shape(cond))
        timesteps = self.timesteps(steps)
        result = SampleOutput(image=x, timesteps=timesteps)
        if keep_trajectory:
            result.latents.append(x)
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i >= steps - grad_last_k):
                out = self.step(x, t, cond, eta, tasks, decode=keep_trajectory)
                x = out.mean + out.std * noise(x.shape)
            if keep_trajectory:
                result.latents.append(x)
                result.steps.append(out)
        result.image = self.to_image(x, cond).clamp(-1, 1)
        return result

    def restore(self, cond: torch.Tensor, steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
                tasks: list[str] | None = None, samples: int = 1) -> torch.Tensor:
        """The restoration to score: the mean of `samples` samples from different starting noise.

        The mean of posterior samples estimates the conditional mean, the MSE-optimal output:
        the part of each sample's error that comes from its starting noise averages out.
        """
        with torch.no_grad():
            images = [self.sample(cond, steps, eta, generator, tasks=tasks).image for _ in range(samples)]
        return torch.stack(images).mean(dim=0)

    # ------------------------------------------------------------------ features (gram)

    def encoder_features(self, images: torch.Tensor, lq: torch.Tensor, tasks: list[str] | None,
                         blocks: int = 1) -> list[torch.Tensor]:
        """Features of clean `images` from the UNet's encoder: conv_in and the first `blocks`
        down blocks, at timestep 0 with the LQ as condition (the gram regularizer's features)."""
        raise ConfigError(f"rl.regularizers: gram compares UNet encoder features, which the {self.layout} layout "
                          f"does not provide (pixel and ldm_sr do)")


class PixelRestorer(Restorer):
    """A diffusers `UNet2DModel` on concat(x_t, LQ) in pixel space, predicting the scheduler's
    `prediction_type` of the GT image or of the residual GT - LQ. A checkpoint is a diffusers
    folder (unet/, scheduler/) plus restorl.json."""

    layout = "pixel"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, residual: bool, signal_scale: float = 1.0,
                 tasks: list[str] | None = None):
        super().__init__(unet, scheduler, tasks)
        self.signal_scale = signal_scale
        self.residual = residual

    @classmethod
    def build(cls, cfg: ModelConfig, tasks: list[str] | None = None) -> PixelRestorer:
        """A new UNet from `model:`; `tasks`: the task vocabulary, used when `cfg.task_conditioning` is on."""
        tasks = sorted(set(tasks)) if tasks and cfg.task_conditioning else None
        unet = UNet2DModel(
            in_channels=6, out_channels=3, block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block, down_block_types=cfg.down_block_types(),
            up_block_types=cfg.up_block_types(), norm_num_groups=cfg.norm_groups,
            attention_head_dim=cfg.attention_head_dim, num_class_embeds=len(tasks) if tasks else None,
        )
        # A zero output layer makes the untrained model predict "no change" for the sample
        # target (output = LQ): training starts at the LQ baseline instead of below it.
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
        scheduler = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                                  prediction_type=cfg.prediction_type, clip_sample=False)
        return cls(unet, scheduler, cfg.residual, cfg.signal_scale, tasks)

    @classmethod
    def from_folder(cls, path: Path, meta: dict) -> PixelRestorer:
        unet = UNet2DModel.from_pretrained(path / "unet")
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        return cls(unet, scheduler, meta.get("residual", False), meta.get("signal_scale", 1.0), meta.get("tasks"))

    def save_folder(self, path: Path) -> None:
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.train_scheduler.save_pretrained(path / "scheduler")
        (path / META_FILE).write_text(json.dumps(self.meta()))

    def meta(self) -> dict:
        return {"residual": self.residual, "signal_scale": self.signal_scale, "tasks": self.tasks} | self._base_meta()

    def signal(self, gt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (gt - cond if self.residual else gt) * self.signal_scale

    def to_image(self, signal: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        signal = signal / self.signal_scale
        return signal + cond if self.residual else signal

    def noise_shape(self, lq: torch.Tensor) -> tuple[int, ...]:
        return tuple(lq.shape)

    def model_output(self, x_t, t, lq, labels):
        return self.unet(torch.cat([x_t, lq], dim=1), t, class_labels=labels).sample

    def encoder_features(self, images, lq, tasks, blocks=1):
        return unet2d_encoder_features(self.unet, torch.cat([self.signal(images, lq), lq], dim=1),
                                       self.task_labels(tasks, images.shape[0]), blocks)


def unet2d_encoder_features(unet: UNet2DModel, unet_input: torch.Tensor, labels: torch.Tensor | None,
                            blocks: int) -> list[torch.Tensor]:
    """conv_in and the first `blocks` down blocks of a `UNet2DModel` at timestep 0."""
    n = unet_input.shape[0]
    t = torch.zeros(n, dtype=torch.long, device=unet_input.device)
    emb = unet.time_embedding(unet.time_proj(t).to(unet_input.dtype))
    if labels is not None:
        emb = emb + unet.class_embedding(labels).to(unet_input.dtype)
    h = unet.conv_in(unet_input)
    features = [h]
    for block in unet.down_blocks[:blocks]:
        h, _ = block(hidden_states=h, temb=emb)
        features.append(h)
    return features
