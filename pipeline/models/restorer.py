"""The conditional diffusion restorer and the small interface the RL code talks to.

A diffusers `UNet2DModel` sees `concat(x_t, LQ)` and predicts diffusers' `prediction_type`
(epsilon / sample / v_prediction) of the diffused signal, which is either the GT image or the
residual GT - LQ. Training noise comes from a DDPM scheduler, sampling uses DDIM with the same
betas. Images live in [-1, 1]. A checkpoint is a plain diffusers folder (unet/, scheduler/)
plus `restorl.json`.

The interface a larger restorer (ControlNet on a latent model, ...) would also implement:
`step` (one Gaussian policy step: mean, std, x0-hat), `sample`, `sft_loss`, `reference`.
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

from pipeline.config import NORM_GROUPS, ModelConfig
from pipeline.device import autocast

META_FILE = "restorl.json"


@dataclass
class StepOutput:
    mean: torch.Tensor  # mean of x_prev given x_t: the policy's action mean
    std: float  # its standard deviation (0 for deterministic DDIM and for the last step)
    x0: torch.Tensor  # predicted clean *image* (not residual), in [-1, 1] space


@dataclass
class SampleOutput:
    image: torch.Tensor  # restored image in [-1, 1]
    # With keep_trajectory: x_t at every step (len steps + 1), and each step's output.
    latents: list[torch.Tensor] = field(default_factory=list)
    steps: list[StepOutput] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)


class DiffusionRestorer(torch.nn.Module):
    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, residual: bool, signal_scale: float = 1.0,
                 tasks: list[str] | None = None):
        super().__init__()
        self.signal_scale = signal_scale
        self.tasks = list(tasks) if tasks else None  # class-label vocabulary when task-conditioned
        self.unet = unet
        self.train_scheduler = scheduler
        # `trailing` spacing starts sampling at the last training step (pure noise) and ends
        # with a step to alpha=1, whose std is 0: the deterministic final step.
        self.sample_scheduler = DDIMScheduler.from_config(
            scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
        self.residual = residual

    # ------------------------------------------------------------------ construction / io

    @classmethod
    def build(cls, cfg: ModelConfig, tasks: list[str] | None = None) -> "DiffusionRestorer":
        """`tasks`: the task vocabulary, used when `cfg.task_conditioning` is on."""
        n = len(cfg.block_out_channels)
        tasks = sorted(set(tasks)) if tasks and cfg.task_conditioning else None
        unet = UNet2DModel(
            in_channels=6, out_channels=3, block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block, down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n, norm_num_groups=NORM_GROUPS,
            num_class_embeds=len(tasks) if tasks else None,
        )
        # A zero output layer makes the untrained model predict "no change" for the sample
        # target (output = LQ): training starts at the LQ baseline instead of below it.
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
        scheduler = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                                  prediction_type=cfg.prediction_type, clip_sample=False)
        return cls(unet, scheduler, cfg.residual, cfg.signal_scale, tasks)

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.train_scheduler.save_pretrained(path / "scheduler")
        (path / META_FILE).write_text(json.dumps({"residual": self.residual, "signal_scale": self.signal_scale, "tasks": self.tasks}))

    @classmethod
    def from_pretrained(cls, path: Path) -> "DiffusionRestorer":
        path = Path(path)
        if not (path / META_FILE).exists():
            raise FileNotFoundError(f"{path}: not a restorl checkpoint (no {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        unet = UNet2DModel.from_pretrained(path / "unet")
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        return cls(unet, scheduler, meta["residual"], meta.get("signal_scale", 1.0), meta.get("tasks"))

    def reference(self) -> "DiffusionRestorer":
        """A frozen copy (the KL anchor for RL)."""
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
            out = self.unet(torch.cat([x_t, cond], dim=1), t, class_labels=labels).sample
        return out.float()

    def signal(self, gt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (gt - cond if self.residual else gt) * self.signal_scale

    def to_image(self, signal: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        signal = signal / self.signal_scale
        return signal + cond if self.residual else signal

    def sft_loss(self, gt: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                 tasks: list[str] | None = None) -> torch.Tensor:
        """Per-sample denoising loss (B,) for the configured prediction target (pixel mean)."""
        x0 = self.signal(gt, cond)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=generator, device="cpu").to(x0.device)
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
             tasks: list[str] | None = None) -> StepOutput:
        """One DDIM step as a Gaussian policy: x_prev ~ N(mean, std^2 I).

        `timesteps(steps)` must have been called for the schedule `t` belongs to.
        """
        out = self.predict(x_t, t, cond, tasks)
        # With zero variance noise, DDIM's prev_sample is exactly the Gaussian's mean.
        res = self.sample_scheduler.step(out, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t))
        return StepOutput(res.prev_sample, self.step_std(t, eta), self.to_image(res.pred_original_sample, cond))

    def sample(self, cond: torch.Tensor, steps: int, eta: float = 0.0,
               generator: torch.Generator | None = None, keep_trajectory: bool = False,
               grad_last_k: int = 0, tasks: list[str] | None = None) -> SampleOutput:
        """DDIM sampling from pure noise; gradients flow only through the last `grad_last_k` steps."""
        x = torch.randn(cond.shape, generator=generator, device="cpu").to(cond.device)
        timesteps = self.timesteps(steps)
        result = SampleOutput(image=x, timesteps=timesteps)
        if keep_trajectory:
            result.latents.append(x)
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i >= steps - grad_last_k):
                out = self.step(x, t, cond, eta, tasks)
                noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
                x = out.mean + out.std * noise
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

