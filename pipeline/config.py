"""The one validated schema for params.yaml.

Every knob of every stage lives in params.yaml, grouped by stage; the defaults below are
params.yaml's values (a test holds them equal). Loading goes through `load_params`, so a typo
or a wrong type fails before any work starts, with the offending key spelled out. Names that
pick a part (a degradation, an RL objective, ...) are checked against the registries that hold
the parts (pipeline/part_names.py), so this module imports none of them.
Profiles (``pipeline/profiles/<name>.yaml``, installed with the package, or any ``.yaml`` file
named by its path) are partial overrides deep-merged on top.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"  # package data: installed with restorl


class ConfigError(UserError, ValueError):
    """A params file (or an override) is invalid; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# runtime / tracking


# A stage asked for CUDA on a machine without it (checked by the stage command and setup_runtime).
NO_CUDA = "runtime.device is 'cuda' but torch sees no CUDA device here; use auto or cpu"


class RuntimeConfig(Section):
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads; set explicitly: two busy threads beside another process slow elementwise ops many-fold")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Forward passes of the restorer: auto = bf16 autocast on CUDA, fp32 on the CPU; fp16
    # trains with a gradient scaler (torch.amp.GradScaler), saved with the resume state.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # DataLoader worker processes reading training pairs from disk (0: in the training
    # process). The batches are the same for any number (their draws are made apart).
    loader_workers: int = Field(0, ge=0)


class TrackingConfig(Section):
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the workspace.
    uri: str | None = None
    experiment: str = "restorl"
    registered_model: str = "restorer"


# ---------------------------------------------------------------------------------------------
# prepare


class SourceConfig(Section):
    kind: Literal["skimage", "folder", "pairs", "faces"] = "skimage"
    # folder: a directory of HQ images; pairs: a directory with lq/ and gt/ of equal names.
    path: str | None = None
    # skimage only: which bundled images to use (names of functions in skimage.data).
    images: list[str] = Field(default_factory=list)
    # faces only: how many of skimage's 100 LFW face crops (`lfw_subset`) to use, each one
    # a source image (pipeline/data/sources.py: load_faces).
    face_count: int = Field(100, ge=3, le=100)

    @model_validator(mode="after")
    def _path_matches_kind(self) -> SourceConfig:
        if self.kind in ("folder", "pairs") and not self.path:
            raise ValueError(f"source.path is required when source.kind is '{self.kind}'")
        if self.kind == "skimage" and not self.images:
            raise ValueError("source.images must list at least one skimage.data image")
        return self


class SplitConfig(Section):
    # Split is by source image, never by patch. Explicit names win over fractions.
    val: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)


class TaskConfig(Section):
    """One degradation family; `weight` is its share when a patch's primary task is drawn."""

    weight: float = Field(1.0, ge=0.0)
    # Each range is [low, high]; a patch draws its parameter uniformly from it.
    params: dict[str, tuple[float, float]] = Field(default_factory=dict)


class DegradationConfig(Section):
    # Probability that a second, different task is applied after the primary one.
    mix_prob: float = Field(0.0, ge=0.0, le=1.0)
    tasks: dict[str, TaskConfig]

    @field_validator("tasks")
    @classmethod
    def _ranges_and_weights(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        # Task and parameter names are checked against the degradations themselves
        # (pipeline/data/degradations.py: check_names) before any stage runs.
        for name, task in tasks.items():
            for param, (lo, hi) in task.params.items():
                if lo > hi:
                    raise ValueError(f"{name}.params.{param}: low {lo} > high {hi}")
        if not any(t.weight > 0 for t in tasks.values()):
            raise ValueError("at least one degradation task needs weight > 0")
        return tasks


class PrepareConfig(Section):
    source: SourceConfig = SourceConfig(
        images=["astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "brick", "grass", "gravel",
                "moon", "clock", "coins", "coffee", "chelsea", "camera", "cell"]
    )
    split: SplitConfig = SplitConfig(val=["coffee", "coins", "cell"], test=["chelsea", "camera", "clock"])
    patch_size: int = Field(32, ge=16, le=512, description="multiple of 8 (three UNet down-samplings)")
    # Write each LQ at 1/lq_scale of the GT's size (its area average): the input of a
    # super-resolution layout whose autoencoder downscales by lq_scale (docs/layouts.md).
    lq_scale: int = Field(1, ge=1)
    patches_per_image: dict[str, int] = Field(default_factory=lambda: {"train": 200, "val": 16, "test": 48})
    # A crop whose grey level's standard deviation (0..1) is below this is drawn again (up to 50
    # times, then the most textured draw is kept): flat crops teach nothing, and their degraded
    # twins are too close to them (often above 50 dB) for any quality model to rank. 0: off.
    min_patch_std: float = Field(0.02, ge=0.0, lt=0.5)
    degradations: DegradationConfig = DegradationConfig(tasks={
        "gaussian_noise": TaskConfig(params={"sigma": (0.02, 0.06)}),
        "low_light": TaskConfig(params={"gain": (0.25, 0.5), "gamma": (1.2, 1.6), "noise": (0.005, 0.015)}),
        "motion_blur": TaskConfig(params={"length": (3, 6), "angle": (0, 180)}),
        "defocus_blur": TaskConfig(params={"radius": (1.0, 2.0)}),
        "downsample": TaskConfig(params={"scale": (2, 3)}),
        "rain_streaks": TaskConfig(params={"density": (0.01, 0.03), "length": (5, 9), "angle": (60, 120),
                                           "opacity": (0.3, 0.6)}),
        "jpeg": TaskConfig(params={"quality": (15, 35)}),
    })

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _lq_scale_divides_the_patch(self) -> PrepareConfig:
        if self.patch_size % self.lq_scale:
            raise ValueError(f"lq_scale {self.lq_scale} does not divide patch_size {self.patch_size}")
        return self

    @field_validator("patches_per_image")
    @classmethod
    def _splits(cls, v: dict[str, int]) -> dict[str, int]:
        if set(v) != {"train", "val", "test"} or min(v.values()) < 1:
            raise ValueError("needs train, val and test, each >= 1")
        return v


# ---------------------------------------------------------------------------------------------
# model / sft / evaluate


class LoraConfig(Section):
    """Low-rank adapters (peft) on the UNet: SFT and RL train only these."""

    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    # Module names (suffixes) that get adapters: the convolutions of diffusers' ResnetBlock2D
    # and the projections of its attention blocks.
    target_modules: list[str] = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]


class ModelConfig(Section):
    # A diffusers folder (local path or s3:// prefix) to start from instead of building a new
    # UNet; its layout (pixel, ldm_sr, sd_upscale) is read from the folder (docs/layouts.md).
    pretrained: str | None = None
    layout: Literal["auto", "pixel", "ldm_sr", "sd_upscale"] = "auto"
    prompt: str = ""  # sd_upscale: the text prompt, embedded once
    noise_level: int = Field(20, ge=0)  # sd_upscale: noise added to the LQ, its class label
    lora: LoraConfig | None = None  # null: fine-tune every UNet weight
    # The architecture of a UNet restorl builds (pretrained: null).
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    norm_groups: int = Field(8, ge=1)  # GroupNorm groups; must divide every block's channels
    attention_levels: tuple[int, ...] = ()  # indices of the blocks with self-attention
    attention_head_dim: int = Field(8, ge=1)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    # diffusers' prediction_type: what the UNet outputs.
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "sample"
    # Diffuse the residual GT - LQ instead of GT itself (the output is LQ + sample).
    residual: bool = True
    # Multiplies the diffused signal so it has roughly unit spread (as a VAE's scaling_factor
    # does): the GT - LQ residual is small next to unit noise otherwise.
    signal_scale: float = Field(1.0, gt=0)
    train_timesteps: int = Field(1000, ge=10)
    # Condition the UNet on the degradation task (a learned class embedding). A 32 px patch
    # alone cannot tell a dark scene from a low-light capture or a smooth one from a blurred
    # one, so an unconditioned model has to hedge across tasks. Labels come from the manifest;
    # ready pairs all share the task `pairs`.
    task_conditioning: bool = True
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"

    @model_validator(mode="after")
    def _architecture(self) -> ModelConfig:
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_groups]
        if not self.block_out_channels or bad:
            raise ValueError(f"block_out_channels {list(bad) or 'is empty'}: every block needs a positive channel "
                             f"count divisible by norm_groups ({self.norm_groups})")
        outside = [i for i in self.attention_levels if not 0 <= i < len(self.block_out_channels)]
        if outside:
            raise ValueError(f"attention_levels {outside}: block indices run from 0 to "
                             f"{len(self.block_out_channels) - 1}")
        if self.lora is not None and self.pretrained is None:
            raise ValueError("lora needs model.pretrained: adapters on a new, untrained UNet learn nothing a full "
                             "fine-tune would not")
        return self

    def down_block_types(self) -> tuple[str, ...]:
        return tuple("AttnDownBlock2D" if i in self.attention_levels else "DownBlock2D"
                     for i in range(len(self.block_out_channels)))

    def up_block_types(self) -> tuple[str, ...]:
        """The decoder mirrors the encoder: up block i works at the resolution of down block n - 1 - i."""
        return tuple("AttnUpBlock2D" if kind.startswith("Attn") else "UpBlock2D"
                     for kind in reversed(self.down_block_types()))


class SamplingConfig(Section):
    steps: int = Field(2, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    # Restore with this many samples (different starting noise) and keep their mean: the
    # conditional mean, which PSNR/SSIM reward; each sample's noise-driven error averages out.
    samples: int = Field(8, ge=1)


class SftConfig(Section):
    steps: int = Field(1800, ge=1)
    # mse: plain mean. task_balanced: each sample's loss divided by the mean LQ error |GT - LQ|^2
    # of its task over the training split, so a task with large residuals (low light, ~80x
    # the MSE of slight blur) does not own the gradient. One weight per task, not per sample:
    # per-sample weights gave near-clean patches huge weights and froze the model (docs/results.md).
    loss: Literal["mse", "task_balanced"] = "task_balanced"
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.99, ge=0, lt=1)
    warmup_steps: int = Field(50, ge=0)
    # A diffusers get_scheduler name, after `warmup_steps`; cosine decays to 0 at `steps`, so
    # the final weights are not a snapshot of a noisy constant-LR walk.
    lr_schedule: Literal["constant_with_warmup", "cosine", "linear"] = "cosine"
    augment: bool = True  # one of the 8 flips/rotations per sample, drawn per step
    # Train on random crops of this size (px of the GT; a multiple of prepare.lq_scale) cut from
    # each patch on the fly; None: whole patches.
    crop_size: int | None = Field(None, ge=8)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)


class BenchmarkConfig(Section):
    """A held-out image folder `evaluate` scores every model on, beside the test split."""

    # A folder or s3:// prefix: HQ images (cut and degraded as prepare does: patch_size,
    # lq_scale, degradations) or ready pairs (gt/ and lq/ with the same names).
    path: str
    patches_per_image: int = Field(16, ge=1)
    # Ready pairs: the degradation their LQ shows (a task-conditioned restorer needs the name).
    task: str | None = None


class EvaluateConfig(Section):
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(64, ge=1)
    grid_images: int = Field(8, ge=1)
    # PSNR/SSIM etc. by pyiqa metric name (full-reference) and no-reference metrics.
    fr_metrics: list[str] = Field(default_factory=lambda: ["psnr", "ssim", "gmsd", "fsim", "nlpd"])
    nr_metrics: list[str] = Field(default_factory=lambda: ["piqe"])
    # name -> a held-out image folder, each a block of metrics/evaluate.json and the table.
    benchmarks: dict[str, BenchmarkConfig] = Field(default_factory=dict)
    # Further sampler settings SFT and RL restore the test split with, for the perception-
    # distortion picture (plots/frontier.csv, .png): PSNR against realism and the reward.
    frontier: list[SamplingConfig] = Field(default_factory=lambda: [
        SamplingConfig(steps=2, eta=0.0, samples=1), SamplingConfig(steps=10, eta=0.0, samples=1),
        SamplingConfig(steps=10, eta=1.0, samples=1)])


# ---------------------------------------------------------------------------------------------
# reward


class RewardConfig(Section):
    """The learned no-reference reward model (a small residual CNN, pipeline/models/reward_model.py)."""

    steps: int = Field(800, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    kernels: int = Field(24, ge=1)   # channels of the first stage; the second has twice as many
    hidden: int = Field(64, ge=1)    # width of the scoring head
    blocks: int = Field(1, ge=0)     # residual blocks per stage
    # Training patches restored by the SFT model to make GT > SFT > LQ pairs; the reward trains on them.
    sft_samples: int = Field(1600, ge=1)
    # How SFT restores them: one sample by default, not evaluate.sampling's mean of 8. That is an
    # eighth of the cost, and a single sample is what RL's rollouts are when the reward scores
    # them. The checks still score SFT outputs as `evaluate` restores them.
    sft_sampling: SamplingConfig = SamplingConfig(samples=1)
    # Freshly degraded copies of each of those GT patches, extra negatives (GT > copy).
    fresh_negatives: int = Field(2, ge=0)
    # Weight of the hack pairs (SFT output > SFT output + each hack control) in the loss.
    hack_weight: float = Field(1.0, ge=0)
    # Weight of the detail pairs: GT > GT plus the fine part of SFT's error (its high-pass), and
    # SFT less that part > SFT: residual noise, streaks and lost edges cost score at SFT's own
    # brightness. 0 for the reward (with 1, RL moved val realism further from GT), 1 for the judge.
    detail_weight: float = Field(0.0, ge=0)


class JudgeConfig(RewardConfig):
    """The held-out judge: a second reward model of the same kind, trained by the `judge` stage
    as the reward is, on patches of its own `source` images, which `prepare` must not use: a
    no-reference score `evaluate` reports that neither the reward nor RL ever saw the images of.
    The inherited keys mean what they mean for the reward (`sft_samples`: judge patches restored
    by SFT and trained on)."""

    # Bundled skimage images outside prepare's default list: retina (a 1411 px colour fundus
    # photograph), stereo_motorcycle (the left view of a 741 px colour stereo pair: the one
    # natural photograph left) and page and text (grey scans of print: edges and flat paper,
    # content the training images lack). Synthetic ones (colorwheel, logo, horse) and
    # lfw_subset (the faces profile's source) are left out.
    source: SourceConfig = SourceConfig(images=["retina", "stereo_motorcycle", "page", "text"])
    patches_per_image: int = Field(400, ge=1)
    seed: int = 1  # its own draws (patches, degradations, batches, weights): not runtime.seed's
    # Share of the judge's patches held out (a seeded draw) for its checks (checkpoints/judge/checks.json).
    # Patches of one image may overlap, so these checks are an optimistic, sanity-level measure.
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    # With the detail pairs the judge ranks GT above SFT on 0.70 of the val images' patches
    # instead of 0.58 (0.65 instead of 0.48 on low light): docs/judge.md.
    detail_weight: float = Field(1.0, ge=0)

    @field_validator("source")
    @classmethod
    def _hq_images(cls, v: SourceConfig) -> SourceConfig:
        if v.kind not in ("skimage", "folder"):
            raise ValueError(f"kind '{v.kind}': the judge is trained on HQ images, skimage or a folder")
        return v


# ---------------------------------------------------------------------------------------------
# score / rl


class ScoreConfig(Section):
    """Difficulty of training samples under the SFT model: the RL stage's pool and its seed.

    difficulty = reward(GT) - reward(output) + fidelity_weight * (1 - SSIM(output, GT)).
    Outputs are sampled the way RL rolls out (`rl.steps`, `rl.eta`), so the score table and
    the online refresh from rollouts measure the same thing.
    """

    # How many training patches to score (a seeded random subset); null: all of them.
    # RL draws its images from the scored ones.
    samples: int | None = Field(192, ge=2)
    fidelity_weight: float = Field(1.0, ge=0)
    batch_size: int = Field(64, ge=1)
    bins: int = Field(30, ge=2, description="histogram bins of plots/difficulty_hist.png")


class DifficultyConfig(Section):
    """Mixing of the RL and SFT losses per sample: w * L_RL + (1 - w) * lambda_sft * L_SFT."""

    # adaptive: w ramps from 0 at quantile q_lo to 1 at q_hi of the running difficulties.
    # uniform: every sample gets the adaptive rule's mean weight 1 - (q_lo + q_hi) / 2 (ablation).
    # rl_only: w = 1 for every sample, RL alone without the SFT term (DDPO and the other methods).
    weighting: str = "adaptive"
    q_lo: float = Field(0.3, ge=0, le=1)
    q_hi: float = Field(0.7, ge=0, le=1)
    window: int = Field(512, ge=1, description="running window of difficulties for the quantiles")
    lambda_sft: float = Field(1.0, ge=0)
    # Share of each epoch's images drawn in proportion to their difficulty rank (0: uniform draw).
    oversample: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered_quantiles(self) -> DifficultyConfig:
        if self.q_lo >= self.q_hi:
            raise ValueError(f"q_lo ({self.q_lo}) must be below q_hi ({self.q_hi})")
        return self


class CocaConfig(Section):
    """CoCA step credit (`step_credit: coca`, pipeline/rl/credit.py)."""

    window: int = Field(2, ge=1, description="steps per window of the cosine curve")
    clip: float = Field(5.0, gt=0, description="per-step advantages are clipped to [-clip, clip]")
    # Cosine of x0-hat - LQ against final - LQ: the LQ that every step's image shares would
    # otherwise put every cosine near 1 and hide what the steps changed.
    relative_to_lq: bool = True


class NoiseLevelConfig(Section):
    """LRPO's noise-level advantage (`step_weighting: noise_level`): A_j * clip(sigma_j / mean sigma)."""

    min_scale: float = Field(0.5, ge=0)
    max_scale: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> NoiseLevelConfig:
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must not exceed max_scale ({self.max_scale})")
        return self


class ReflConfig(Section):
    """RFSR's reward feedback (`objective: refl`, pipeline/rl/objectives.py).

    Step j of S sits at p = (j + 1) / S of the schedule: p <= early_until is the early window
    (L1 of the wavelet LL bands of x0-hat and GT), p > late_from the late window (the reward
    of x0-hat), steps between are not trained by this objective.
    """

    early_until: float = Field(0.4, ge=0, lt=1)
    late_from: float = Field(0.8, ge=0, lt=1)
    # Gradient through this many steps ending at the scored one (1: ReFL; K at the last step: DRaFT-K).
    grad_steps: int = Field(1, ge=1)
    reward_weight: float = Field(0.1, ge=0)
    dwt_weight: float = Field(1.0, ge=0)
    wavelet: str = "haar"
    dwt_level: int = Field(1, ge=1, description="LL band of this decomposition level")

    @model_validator(mode="after")
    def _ordered_windows(self) -> ReflConfig:
        if self.early_until > self.late_from:
            raise ValueError(f"early_until ({self.early_until}) must not exceed late_from ({self.late_from})")
        return self


class GramConfig(Section):
    """RFSR's anti-stylisation term (`regularizers: [gram]`, pipeline/rl/regularizers.py)."""

    weight: float = Field(0.01, ge=0)
    blocks: int = Field(1, ge=0, description="UNet down blocks after conv_in whose features are compared")


class GtLikelihoodConfig(Section):
    """LRPO's GT-guided likelihood (`regularizers: [gt_likelihood]`): 1 - exp(log p / tau)."""

    weight: float = Field(1e-3, ge=0)
    last_steps: int = Field(2, ge=1, description="applies to the last this-many stochastic steps")
    tau: float = Field(40.0, gt=0)


class RlConfig(Section):
    """Difficulty-adaptive RL from the learned reward: reward feedback (`refl`) on hard samples,
    the SFT loss on easy ones. `objective: ppo` with `kl_beta` ~50 is the policy-gradient variant
    (pipeline/profiles/methods/ppo.yaml).

    The other seed methods are combinations of the parts below (docs/rl_methods.md,
    pipeline/profiles/methods/*.yaml): `objective`, `step_credit`, `step_weighting`, `regularizers`.
    """

    # Seed of this stage's generator (image draws, rollout noise, minibatches); None: runtime.seed.
    # Varies RL alone: runtime.seed would also redo prepare and sft (`restorl ablate`).
    seed: int | None = None
    epochs: int = Field(8, ge=1)
    images_per_epoch: int = Field(8, ge=1, description="LQ images rolled out per epoch")
    group_size: int = Field(4, ge=2, description="rollouts per LQ image (the advantage's group)")
    steps: int = Field(10, ge=2, description="DDIM steps of a rollout")
    eta: float = Field(1.0, gt=0, le=1, description="DDIM eta; > 0 makes each step a Gaussian policy")
    # Scorer name -> weight (pipeline/rewards/scorers.py); `learned` is the reward stage's model.
    reward: dict[str, float] = Field(default_factory=lambda: {"learned": 1.0})
    # Reward checkpoints: after k of `steps` denoising steps the predicted clean image is scored
    # (k = steps: the final image, which must be listed). Each is normalised within its group.
    # null: the final image only (terminal reward).
    reward_steps: list[int]
    advantage_std: Literal["group", "global"] = "group"
    advantage_clip: float = Field(5.0, gt=0)
    # What the update minimises per sample (pipeline/rl/objectives.py, by name): ppo (clipped
    # ratio on recorded steps) or refl
    # (gradient through a differentiable reward of one step's x0-hat; RFSR).
    objective: str = "refl"
    # How checkpoint advantages become per-step advantages (pipeline/rl/credit.py, by name).
    step_credit: str = "next_checkpoint"
    # A per-step scale on those advantages (pipeline/rl/credit.py STEP_WEIGHTING).
    step_weighting: str = "uniform"
    # Extra per-sample loss terms, each with its own settings below (pipeline/rl/regularizers.py).
    regularizers: list[str] = Field(default_factory=list)
    coca: CocaConfig = CocaConfig()
    noise_level: NoiseLevelConfig = NoiseLevelConfig()
    refl: ReflConfig = ReflConfig()
    gram: GramConfig = GramConfig()
    gt_likelihood: GtLikelihoodConfig = GtLikelihoodConfig()
    # Share of the stochastic steps trained per sample and inner epoch (a seeded random subset).
    train_step_fraction: float = Field(0.35, gt=0, le=1)
    inner_epochs: int = Field(1, ge=1)
    minibatch: int = Field(16, ge=1)
    lr: float = Field(7.5e-6, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    ppo_clip: float = Field(1e-3, gt=0)
    # KL to the frozen SFT model (0: off; refl is anchored by the SFT term instead). With ppo the
    # KL's pull on a step mean relative to the policy gradient's push is about
    # beta * sqrt(2 KL) / mean|A| (logged as kl_pull); at lr 3e-5 KL stays ~1e-5 per step, so
    # beta must be ~50 for that to reach ~0.1-0.3. beta 0.05 (a common default) does nothing.
    kl_beta: float = Field(0.0, ge=0)
    difficulty: DifficultyConfig = DifficultyConfig()
    # Validation each epoch on this many val patches (evaluate.sampling): the best epoch by
    # val reward gain over SFT among those whose PSNR fell by at most psnr_guard dB, overall
    # and on every task, ships.
    val_images: int = Field(48, ge=1)
    psnr_guard: float = Field(0.3, ge=0)
    # ... and whose mean score by the held-out judge (checkpoints/judge) on those patches fell by
    # at most this much below SFT's: a reward gain the judge does not share does not ship. The
    # judge only vetoes (it is never a reward). None: no judge check (and no judge needed).
    judge_guard: float | None = Field(0.0, ge=0)
    # RL refuses a learned reward that failed its held-out checks (checkpoints/reward/checks.json) unless
    # this is true; an override is tagged on the RL run (restorl.reward_checks_failed). The
    # default params.yaml sets it (its reward fails on the val image `cell`; docs/results.md).
    allow_failed_reward_checks: bool = True

    @field_validator("regularizers")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a regularizer twice: {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _final_reward_only(cls, data: Any) -> Any:
        """`reward_steps: null` (or absent) means the final image only: [steps]."""
        if isinstance(data, dict) and data.get("reward_steps") is None:
            data = dict(data, reward_steps=[data.get("steps", cls.model_fields["steps"].default)])
        return data

    @field_validator("reward")
    @classmethod
    def _some_reward(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("needs at least one scorer, e.g. {learned: 1.0}")
        if "judge" in v:
            raise ValueError("'judge' is the held-out judge (checkpoints/judge), which only evaluates: a model "
                             "trained on it could not be judged by it; use learned or pyiqa names")
        return v

    @model_validator(mode="after")
    def _checkpoints_within_steps(self) -> RlConfig:
        ks = self.reward_steps
        if not ks or ks != sorted(set(ks)) or ks[0] < 1 or ks[-1] != self.steps:
            raise ValueError(f"reward_steps {ks} must be increasing step counts in [1, steps] ending "
                             f"with steps={self.steps} (the final image)")
        return self


# ---------------------------------------------------------------------------------------------
# promote / storage


class PromoteConfig(Section):
    """The gate from the version the `rl` stage registered (metrics/rl.json) to `champion`; both
    are scored on the same test split with `evaluate.sampling`. Figures are split means."""

    # `learned`: the reward model in checkpoints/reward, which must be the one the challenger was
    # trained with; or a pyiqa metric name (its direction comes from pyiqa).
    reward: str = "learned"
    # Required improvement of the reward, in its better direction (0: must not get worse).
    min_reward_gain: float = 0.0
    # Full-reference judges the challenger was not trained on -> how much worse than the best of
    # the champion lineage it may be (in the metric's units; the direction comes from pyiqa).
    # Against the lineage's best, not the current champion's: tolerances cannot ratchet down.
    guards: dict[str, float] = Field(default_factory=lambda: {"psnr": 0.1, "ssim": 0.005, "gmsd": 0.002})
    # The held-out judge (checkpoints/judge, a no-reference model trained on images neither the
    # reward nor RL saw) scores both on test: the challenger's mean may fall at most this below
    # the champion's (raw judge units; 0: no fall at all). None: not checked, no judge needed.
    judge_guard: float | None = 0.0

    @field_validator("judge_guard")
    @classmethod
    def _judge_guard(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"{v} must be >= 0 (or null: no judge check)")
        return v

    @field_validator("guards")
    @classmethod
    def _guards(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one full-reference judge (e.g. psnr, ssim, gmsd) must guard promotion")
        bad = sorted(k for k, tol in v.items() if not tol >= 0)
        if bad:
            raise ValueError(f"tolerances of {bad} must be >= 0")
        return v


class StorageConfig(Section):
    """S3 endpoints and prefixes. Never credentials: those come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) or `.dvc/config.local`."""

    # None: $AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str | None = None
    # s3://bucket/prefix holding pyiqa weight files, mirrored by `restorl weights sync`.
    weights_uri: str | None = None
    # Local pyiqa weight cache; None: pyiqa's default (~/.cache/torch/hub/pyiqa).
    weights_dir: str | None = None
    # s3://bucket/prefix where sft and rl mirror their resume state after each checkpoint, so a
    # task retried on another machine (a pre-empted pod) continues where the first one stopped.
    # None: the state stays in checkpoints/resume/ only.
    resume_uri: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"'{v}' needs its scheme, e.g. http://127.0.0.1:9000 or https://s3.example.com")
        return v

    @field_validator("weights_uri", "resume_uri")
    @classmethod
    def _s3_uri(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("s3://"):
            raise ValueError("must be an s3://bucket/prefix URI")
        return v


class Params(Section):
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    sft: SftConfig = SftConfig()
    reward: RewardConfig = RewardConfig()
    judge: JudgeConfig = JudgeConfig()
    score: ScoreConfig = ScoreConfig()
    rl: RlConfig = RlConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _judge_holds_its_images_out(self) -> Params:
        """The judge's source images are none of prepare's (by skimage name, or the same folder)."""
        judge, prepare = self.judge.source, self.prepare.source
        if judge.kind == prepare.kind == "skimage":
            shared = [name for name in judge.images if name in prepare.images]
            if shared:
                raise ValueError(f"judge.source.images: '{shared[0]}' is also in prepare.source.images; the judge "
                                 "must be trained on images the reward and RL never see")
        if judge.kind == prepare.kind == "folder" and judge.path == prepare.path:
            raise ValueError(f"judge.source.path: {judge.path} is prepare.source.path; the judge must be trained on "
                             "images the reward and RL never see")
        return self

    @model_validator(mode="after")
    def _crop_fits_the_patches(self) -> Params:
        crop, patch, scale = self.sft.crop_size, self.prepare.patch_size, self.prepare.lq_scale
        if crop is not None and (crop > patch or crop % scale):
            raise ValueError(f"sft.crop_size is {crop}: it must be at most prepare.patch_size ({patch}) and a "
                             f"multiple of prepare.lq_scale ({scale})")
        return self

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named sections: which settings made an artefact."""
        blob = json.dumps({n: getattr(self, n).model_dump(mode="json") for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted leaf keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`); lists, scalars and
    empty dicts are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def profile_overrides(profile: str) -> dict[str, Any]:
    """A shipped profile by name, or a profile file by its path (ending in .yaml/.yml)."""
    if profile.endswith((".yaml", ".yml")):
        return read_yaml(Path(profile))
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile '{profile}' not found at {path}; known profiles: {known}")
    return read_yaml(path)


def default_raw() -> dict[str, Any]:
    """The schema's defaults as a params mapping: params.yaml's values, without its comments."""
    raw = Params().model_dump(mode="json")
    raw["rl"]["reward_steps"] = None  # null: [rl.steps], filled in by RlConfig; left to follow rl.steps
    return raw


def validate(raw: dict[str, Any], source: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top level>"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{key}: {msg}" if e["loc"] else msg)  # a whole-file check names its keys itself
        raise ConfigError(f"{source}: invalid params: " + "; ".join(problems)) from None


def load_raw(path: str | Path = "params.yaml", profile: str | None = None,
             defaults_if_missing: bool = False) -> dict[str, Any]:
    """The params file with `profile` merged over it; `defaults_if_missing`: the schema's
    defaults when the file does not exist (how `restorl params` starts a workspace)."""
    raw = default_raw() if defaults_if_missing and not Path(path).exists() else read_yaml(Path(path))
    if profile:
        raw = deep_merge(raw, profile_overrides(profile))
    return raw


def params_source(path: str | Path, profile: str | None = None) -> str:
    """How errors name a params file with a profile merged over it."""
    return str(path) + (f" (profile {profile})" if profile else "")


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """params.yaml with a profile merged over it, validated by the schema (part names are
    checked by pipeline/part_names.py)."""
    return validate(load_raw(path, profile), params_source(path, profile))
