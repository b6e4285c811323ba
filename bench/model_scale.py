"""Parameters, seconds per RL epoch and peak memory of restorers of growing size, and the memory
a deep-copied RL reference would take against the adapters-off view.

    python bench/model_scale.py [--size 64] [--epochs 2] [--threads 2] [--only NAME] [--channels 128,256,384,384]

Each configuration runs in a fresh child process (this script with --one NAME), so memory peaks
do not mix:
  tiny-pixel        params.yaml's restorer (PixelRestorer.build), full fine-tuning, its 32 px patches
  latent-100m-full  a StableDiffusionUpscalePipeline built from config classes (UNet2DConditionModel
                    shaped like the x4 upscaler's with --channels: 101.9 M parameters at the default;
                    AutoencoderKL, 4 latent channels, downscale 4, scaling 0.08333; 1-layer CLIP text
                    encoder), saved with save_pretrained, loaded by loading.load_pretrained; full fine-tuning
  latent-100m-lora  the same with lora.attach(model, LoraConfig(rank=8, alpha=8), "rl")
RL: the smoke profile with images_per_epoch 2, group_size 2, steps 4, minibatch 4, objective refl,
at --size px (latents at size / 4); random images, no prepared data. The reward (rollouts and
refl's feedback) is the `learned` scorer of build_reward on a freshly initialised RewardModel of
the profile's reward architecture: random weights, the real differentiable code path.
An epoch = rollouts (collect + checkpoint rewards) + update (train_on_rollouts); median of --epochs
after one warm-up; `load`: the 1-min load average at the end (above --threads: the figures
shared the CPU). Peak memory of the epochs: CUDA, max_memory_allocated; CPU, the RSS high-water
mark VmHWM (reset through /proc/self/clear_refs after setup) minus the RSS after imports: weights
(mmapped from the safetensors files, paged in as used), optimiser state, activations. Not
ru_maxrss: it keeps the parent's high-water mark across exec (~1.3 GB here). Reference: the bytes
copy.deepcopy duplicates (every parameter and buffer of the restorer) against 0 for the
AdaptersOff view that model.reference() returns under LoRA; the epochs run without one (refl
with kl_beta 0 needs none). An RSS delta around model.reference() misleads on the CPU: the copy
pages in the mmapped source weights (~2x) or reuses freed memory (~0.4x).
Prints figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import LoraConfig, ModelConfig, deep_merge, load_params, load_raw, validate

CONFIGS = ("tiny-pixel", "latent-100m-full", "latent-100m-lora")
RL = {"images_per_epoch": 2, "group_size": 2, "steps": 4, "minibatch": 4, "objective": "refl", "reward_steps": [4]}
MIB = 2 ** 20


def bench_params(threads: int):
    return validate(deep_merge(load_raw("params.yaml", "smoke"), {"runtime": {"threads": threads}, "rl": RL}), "bench")


def save_sd_upscale(folder: Path, channels: tuple[int, ...], size: int) -> None:
    """An x4-upscaler-shaped StableDiffusionUpscalePipeline with random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir, text_dim = folder.parent / "vocab", 256
    vocab_dir.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,")
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (vocab_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=text_dim, intermediate_size=2 * text_dim, projection_dim=text_dim,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=size // 4, in_channels=7, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim, attention_head_dim=8, use_linear_projection=True, num_class_embeds=351)
    vae = AutoencoderKL(
        sample_size=size, block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=16,
        scaling_factor=0.08333)
    scheduler = DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_end=0.02,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   low_res_scheduler=DDPMScheduler(), scheduler=scheduler,
                                   max_noise_level=350).save_pretrained(folder)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS) or its high-water mark (VmHWM), from /proc."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run_one(name: str, args, work: Path) -> dict:
    """One configuration's figures (in the child process)."""
    # peft and the upscale pipeline (what loading and LoRA import lazily) before the baseline.
    import peft  # noqa: F401
    from diffusers import StableDiffusionUpscalePipeline  # noqa: F401

    from pipeline.device import setup_runtime
    from pipeline.models import lora
    from pipeline.models.loading import load_pretrained
    from pipeline.models.restorer import PixelRestorer
    from pipeline.rewards.scorers import build_reward
    from pipeline.rl import loop, parts
    from pipeline.rl.rollout import collect

    base_mib = rss_mib()
    params = bench_params(args.threads)
    cfg, device = params.rl, setup_runtime(params.runtime)
    cuda = device.type == "cuda"
    tasks = sorted(params.prepare.degradations.tasks)
    if name == "tiny-pixel":
        defaults = load_params("params.yaml")
        model, size = PixelRestorer.build(defaults.model, tasks), defaults.prepare.patch_size
    else:
        model, size = load_pretrained(ModelConfig(pretrained=str(work / "sd_upscale")), None, work / "cache"), args.size
        if name.endswith("lora"):
            lora.attach(model, LoraConfig(rank=8, alpha=8), "rl")
    model.to(device)
    picked = parts.pick(cfg)
    reward = build_reward({"learned": 1.0}, device, learned_path=work / "reward", differentiable=True, probe_size=size)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    n = cfg.images_per_epoch
    gt = (torch.rand(n, 3, size, size, generator=generator) * 2 - 1).to(device)
    lq = (gt + 0.1 * torch.randn(gt.shape, generator=generator).to(device)).clamp(-1, 1)
    image_tasks = [tasks[i % len(tasks)] for i in range(n)]
    w = torch.ones(n * cfg.group_size, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the epochs alone

    def timed(fn, *fn_args):
        start = time.perf_counter()
        out = fn(*fn_args)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    times = []
    for _ in range(args.epochs + 1):
        model.eval()
        r, t_roll = timed(collect, model, lq, gt, image_tasks, cfg.group_size, cfg.steps, cfg.eta, generator)
        rewards, t_rew = timed(loop.checkpoint_rewards, reward, r, cfg.reward_steps)
        samples = loop.EpochSamples(torch.arange(n), r, rewards, None, w, w[:n])
        _, t_upd = timed(loop.train_on_rollouts, model, optimizer, samples, picked, cfg, generator, None, reward)
        times.append((t_roll + t_rew, t_upd))
    timed_epochs = times[1:]  # the first is the warm-up
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else rss_mib("VmHWM") - base_mib
    view = type(model.reference()).__name__ == "AdaptersOff"  # else a deep copy, dropped at once
    tensors = list(model.parameters()) + list(model.buffers())
    return {"config": name, "size": size, "device": str(device),
            "total": sum(p.numel() for p in model.parameters()),
            "trained": sum(p.numel() for p in model.trainable_parameters()),
            "unet": sum(p.numel() for n_, p in model.unet.named_parameters() if "lora_" not in n_),
            "rollout_s": statistics.median(t[0] for t in timed_epochs),
            "update_s": statistics.median(t[1] for t in timed_epochs),
            "epoch_s": statistics.median(sum(t) for t in timed_epochs), "peak_mib": peak,
            "deepcopy_mib": sum(t.numel() * t.element_size() for t in tensors) / MIB,
            "view_mib": 0.0 if view else None, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="output px of the latent models (multiple of 32)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=CONFIGS)
    ap.add_argument("--channels", default="128,256,384,384", help="UNet block_out_channels (multiples of 32)")
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args, Path(args.work))))
        return
    from pipeline.models.reward_model import RewardModel

    names = [args.only] if args.only else list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = bench_params(args.threads).reward
        RewardModel(kernels=r.kernels, hidden=r.hidden, blocks=r.blocks).save(work / "reward")
        if any(n.startswith("latent") for n in names):
            save_sd_upscale(work / "sd_upscale", tuple(int(c) for c in args.channels.split(",")), args.size)
        print(f"rl epoch: {RL['images_per_epoch']} images x G={RL['group_size']}, {RL['steps']} DDIM steps, "
              f"refl, minibatch {RL['minibatch']}; median of {args.epochs} epochs after a warm-up, "
              f"{args.threads} threads; UNet channels of the latent models: {args.channels}")
        print(f"{'config':18s} {'px':>4s} {'params':>12s} {'UNet':>12s} {'trained':>12s} {'s/epoch':>8s} "
              f"{'rollout':>8s} {'update':>7s} {'peak MiB':>9s} {'deepcopy MiB':>13s} {'view MiB':>9s} "
              f"{'load':>5s}")
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--work", tmp, "--size", str(args.size),
                   "--epochs", str(args.epochs), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            d = json.loads(proc.stdout.strip().splitlines()[-1])
            view = "-" if d["view_mib"] is None else f"{d['view_mib']:.0f}"
            print(f"{name:18s} {d['size']:4d} {d['total']:12,d} {d['unet']:12,d} {d['trained']:12,d} "
                  f"{d['epoch_s']:8.2f} {d['rollout_s']:8.2f} {d['update_s']:7.2f} {d['peak_mib']:9.0f} "
                  f"{d['deepcopy_mib']:13.1f} {view:>9s} {d['load']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
