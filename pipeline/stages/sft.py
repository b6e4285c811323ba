"""`sft`: supervised denoising training of the conditional diffusion restorer.

Resumable: every `sft.checkpoint_every` steps the model, optimiser, LR schedule, EMA, RNG and
loss history go to `checkpoints/resume/sft/`; a killed run started again continues from there
(if params and data are unchanged) and ends where an uninterrupted run would have.
Output: the (EMA) model as a diffusers folder in `checkpoints/sft`, `plots/sft_loss.csv`, an
MLflow run and a new version of the registered model.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import mlflow
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from pipeline import checkpoint, tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params
from pipeline.data.dataset import load_split, random_dihedral, sample_weights
from pipeline.device import backward_and_step, grad_scaler, setup_runtime
from pipeline.model_registry import register_restorer
from pipeline.models.loading import model_for_sft
from pipeline.paths import Paths
from pipeline.stage_code import code_hash

SECTIONS = ["model", "sft"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.sft, Paths(root)
    device = setup_runtime(params.runtime)
    train = load_split(paths.data, "train")
    gt_all, lq_all = train.gt.to(device), train.lq.to(device)
    weights = sample_weights(cfg.loss, train).to(device)

    model = model_for_sft(params.model, train.tasks, params.storage, paths.pretrained,
                          train.lq_scale).to(device).train()
    trained = model.trainable_parameters()  # the UNet, or its adapters under model.lora
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                                num_training_steps=cfg.steps)
    ema = EMAModel(trained, decay=cfg.ema_decay) if cfg.ema_decay else None
    generator = torch.Generator().manual_seed(params.runtime.seed)
    scaler = grad_scaler(device)  # fp16 loss scaling; a pass-through otherwise
    resumable = {"model": model, "optimizer": optimizer, "lr_schedule": lr_schedule, "grad_scaler": scaler} | (
        {"ema": ema} if ema else {})

    resume_dir = paths.resume / "sft"
    fingerprint = checkpoint.fingerprint(params, [*SECTIONS, "runtime"], [paths.manifest],
                                         code_hash("sft") + (model.base or {}).get("hash", ""))
    resumed = checkpoint.load_state(resume_dir, fingerprint=fingerprint, objects=resumable, generator=generator)
    start, history = resumed if resumed else (0, {"loss": []})
    if resumed:
        print(f"sft: resuming from step {start} ({resume_dir})")
        if ema:  # the state was loaded onto the CPU; the EMA's shadow weights follow the model
            ema.to(device=device)

    with tracking.stage_run("sft", params, SECTIONS, root) as run:
        mlflow.set_tag("restorl.resumed_from_step", str(start))
        mlflow.log_params({"n_params": sum(p.numel() for p in model.unet.parameters()),
                           "n_trained_params": sum(p.numel() for p in trained)})
        t0 = time.perf_counter()
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", unit="step")
        for step in bar:
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=generator).to(device)
            gt, lq, tasks = gt_all[idx], lq_all[idx], [train.tasks[i] for i in idx.tolist()]
            if cfg.augment:
                gt, lq = random_dihedral(gt, lq, generator)
            loss = (model.sft_loss(gt, lq, generator, tasks=tasks) * weights[idx]).mean()
            checkpoint.ensure_finite(loss, "sft", f"step {step + 1}", resume_dir)
            backward_and_step(loss, optimizer, trained, cfg.grad_clip, scaler)
            lr_schedule.step()
            if ema:
                ema.step(trained)
            history["loss"].append(loss.item())
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                recent = sum(history["loss"][-cfg.log_every:]) / len(history["loss"][-cfg.log_every:])
                bar.set_postfix(loss=f"{recent:.4g}")
                mlflow.log_metric("train_loss", recent, step=done)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint.save_state(resume_dir, fingerprint=fingerprint, step=done, objects=resumable,
                                      generator=generator, stats=history)
        seconds = time.perf_counter() - t0

        if ema:
            ema.copy_to(trained)
        with atomic_dir(paths.sft_model) as tmp:
            model.save_pretrained(tmp)
        _write_loss_plot(paths.plots / "sft_loss.csv", history["loss"], cfg.log_every)
        mlflow.log_metric("train_seconds", seconds)
        mlflow.log_artifact(str(paths.plots / "sft_loss.csv"))
        version = register_restorer(params, paths.sft_model, {
            "restorl.stage": "sft", "restorl.params_hash": params.section_hash(*SECTIONS),
            "restorl.data_hash": checkpoint.file_hash(paths.manifest), "restorl.git_commit": tracking.git_commit(root),
            "restorl.run_id": run.info.run_id}, paths.pretrained)
    checkpoint.clear_state(resume_dir)
    print(f"sft: {cfg.steps} steps in {seconds:.0f}s, final loss {history['loss'][-1]:.4g}; "
          f"registered {params.tracking.registered_model} v{version}")
    return {"steps": cfg.steps, "seconds": seconds, "model_version": version}


def _write_loss_plot(path: Path, losses: list[float], every: int) -> None:
    """Loss averaged over each `every` steps, for `dvc plots`."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        for end in range(every, len(losses) + every, every):
            window = losses[end - every:end]
            writer.writerow([min(end, len(losses)), f"{sum(window) / len(window):.6g}"])
