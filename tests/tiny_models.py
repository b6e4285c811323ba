"""Tiny random-initialised diffusers pipelines saved to disk, for tests that load through the real loading code.

Weights cannot be downloaded in tests, so every sub-model is built from its config class with a fixed torch seed
(the same seed gives the same weights) and the whole pipeline is written with `save_pretrained`. Each model has a
few thousand to a few tens of thousands of parameters; both pipelines upscale by 2 (two `block_out_channels` in the
autoencoder, so one downsample), e.g. a 16x16 input gives a 32x32 output.

- `save_ldm_sr`: a `LDMSuperResolutionPipeline` (UNet2DModel + VQModel + DDIMScheduler, epsilon prediction).
- `save_sd_upscale`: a `StableDiffusionUpscalePipeline` (UNet2DConditionModel with noise-level class embeddings,
  AutoencoderKL, CLIP text encoder and tokenizer, DDIMScheduler with v-prediction as in the real x4 upscaler,
  DDPMScheduler for the low-res noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    LDMSuperResolutionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_CHANNELS = 3
BLOCK_OUT_CHANNELS = (8, 16)  # two blocks -> the autoencoders downscale by 2 ** (2 - 1) = 2
NORM_GROUPS = 4  # divides every entry of BLOCK_OUT_CHANNELS

LDM_LATENT_CHANNELS = 3  # the LDM pipeline draws latents with unet.in_channels // 2 channels, so this must be 3

SD_LATENT_CHANNELS = 4
SD_VAE_SCALING_FACTOR = 0.08333  # the upscale pipeline overwrites (with a deprecation warning) any other value
MAX_NOISE_LEVEL = 350  # the pipeline's default and the real x4 upscaler's value
TEXT_HIDDEN_SIZE = 32
TOKENIZER_MAX_LENGTH = 77  # as in CLIP; the tokenizer pads every prompt to this length

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's unk and pad token
# A few merged tokens so that the BPE merges are exercised: "photo" -> "ph" + "ot" -> "phot" -> "photo</w>".
MERGES = [("p", "h"), ("o", "t"), ("ph", "ot"), ("phot", "o</w>")]


def _scheduler_kwargs() -> dict:
    """DDIM settings shared by both pipelines: no x0 clipping (latents are not in [-1, 1]), SD-style offsets."""
    return {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def save_ldm_sr(path: Path, seed: int = 0) -> Path:
    """Save a tiny `LDMSuperResolutionPipeline` to `path` and return `path`.

    The UNet sees the noisy latents (3 channels) concatenated with the low-res image (3 channels) at the latent
    size, and the VQ-VAE decoder upsamples the denoised latents by 2.
    """
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=LDM_LATENT_CHANNELS + IMAGE_CHANNELS,
        out_channels=LDM_LATENT_CHANNELS,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=NORM_GROUPS,
        attention_head_dim=8,
    )
    vqvae = VQModel(
        sample_size=32,
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        layers_per_block=1,
        latent_channels=LDM_LATENT_CHANNELS,
        num_vq_embeddings=32,
        norm_num_groups=NORM_GROUPS,
    )
    scheduler = DDIMScheduler(prediction_type="epsilon", **_scheduler_kwargs())
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def _write_clip_vocab(folder: Path) -> None:
    """Write a tiny CLIP BPE vocabulary (`vocab.json`, `merges.txt`) into `folder`.

    Tokens are lowercase letters, digits and common punctuation, each alone and with CLIP's `</w>` word-end
    suffix (so any lowercase ASCII text tokenizes), the merge results of `MERGES`, then the two special tokens.
    Characters outside the vocabulary map to the unknown token (`<|endoftext|>`).
    """
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'-")
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in MERGES] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))


def save_sd_upscale(path: Path, seed: int = 0) -> Path:
    """Save a tiny `StableDiffusionUpscalePipeline` to `path` and return `path`.

    The UNet sees the scaled noisy latents (4 channels) concatenated with the noised low-res image (3 channels),
    gets the noise level as `class_labels` through an embedding table with `MAX_NOISE_LEVEL + 1` rows, and
    cross-attends to the CLIP text embeddings. The scheduler predicts v (like the real x4 upscaler).
    """
    tokenizer_dir = path / "tokenizer"
    _write_clip_vocab(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=TOKENIZER_MAX_LENGTH)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=2 * TEXT_HIDDEN_SIZE,
            projection_dim=TEXT_HIDDEN_SIZE,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=SD_LATENT_CHANNELS + IMAGE_CHANNELS,
        out_channels=SD_LATENT_CHANNELS,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=NORM_GROUPS,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=2,  # diffusers reads this as the number of heads
        use_linear_projection=True,
        num_class_embeds=MAX_NOISE_LEVEL + 1,
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
        layers_per_block=1,
        latent_channels=SD_LATENT_CHANNELS,
        norm_num_groups=NORM_GROUPS,
        scaling_factor=SD_VAE_SCALING_FACTOR,
    )
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction", **_scheduler_kwargs()),
        max_noise_level=MAX_NOISE_LEVEL,
    )
    pipeline.save_pretrained(path)
    return path
