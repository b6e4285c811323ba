"""`sft`: supervised denoising training of the conditional diffusion restorer.

Training pairs stream from disk (`PatchPairs` in a DataLoader, `runtime.loader_workers`), so
memory does not grow with the data set; which patch, flip/rotation and crop each row gets is
drawn apart from the reading (`TrainingDraws`), so batches are the same for any number of
workers or processes.
Resumable: every `sft.checkpoint_every` steps the model, optimiser, LR schedule, EMA, RNG and
loss history go to `checkpoints/resume/sft/` (and to `storage.resume_uri` when set); a killed
run started again continues from there (if params and data are unchanged) and ends where an
uninterrupted run would have.
Output: the (EMA) model as a diffusers folder in `checkpoints/sft`, `plots/sft_loss.csv`, an
MLflow run and a new version of the registered model.

Many processes (`torchrun --nproc_per_node N -m pipeline.cli sft`; docs/distributed.md):
`sft.batch_size` is the *global* batch, a multiple of N. Every rank makes the global batch's
draws (patches and augmentation in the sampler, noise and timesteps from the same seeded
generator) and reads only its own rows, computes the loss of
its batch_size / N rows, and steps on the gradients averaged over the ranks: the update of one
process on the whole batch, so N processes end with one process's weights (to float rounding).
Only rank 0 logs to MLflow and writes the model, the plot and the resume state; all ranks resume.
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from pipeline import checkpoint, distributed, tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params
from pipeline.data.dataset import PatchPairs, TrainingDraws, task_weights
from pipeline.device import backward_and_step, grad_scaler, setup_runtime
from pipeline.model_registry import register_restorer
from pipeline.models.loading import model_for_sft
from pipeline.paths import Paths
from pipeline.stage_code import code_hash

SECTIONS = ["model", "sft"]


def run(params: Params, root: Path = Path(".")) -> dict:
    """Train; under a launcher (WORLD_SIZE > 1) every process runs this, `sft.batch_size` is the
    global batch and each process computes the loss of its share (module docstring)."""
    per_rank = distributed.per_rank_batch(params.sft.batch_size, "sft.batch_size")
    with distributed.session(setup_runtime(params.runtime)) as device:
        return _train(params, root, device, per_rank)


def _train(params: Params, root: Path, device: torch.device, per_rank: int) -> dict:
    cfg, paths, main = params.sft, Paths(root), distributed.is_main()
    shard, mine = (distributed.rank(), distributed.world_size()), distributed.rows(per_rank)
    pairs = PatchPairs(paths.data, "train", crop=cfg.crop_size)  # read from disk batch by batch
    weights = task_weights(cfg.loss, pairs).to(device)

    model = model_for_sft(params.model, pairs.tasks, params.storage, paths.pretrained,
                          pairs.lq_scale).to(device).train()
    trained = model.trainable_parameters()  # the UNet, or its adapters under model.lora
    distributed.broadcast_(trained)  # every rank starts from the main process's weights
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                                num_training_steps=cfg.steps)
    ema = EMAModel(trained, decay=cfg.ema_decay) if cfg.ema_decay else None
    generator = torch.Generator().manual_seed(params.runtime.seed)  # the same on every rank
    scaler = grad_scaler(device)  # fp16 loss scaling; a pass-through otherwise
    resumable = {"model": model, "optimizer": optimizer, "lr_schedule": lr_schedule, "grad_scaler": scaler} | (
        {"ema": ema} if ema else {})

    resume_dir = paths.resume / "sft"
    fingerprint = checkpoint.fingerprint(params, [*SECTIONS, "runtime"], [paths.manifest],
                                         code_hash("sft") + (model.base or {}).get("hash", ""))
    remote = checkpoint.RemoteState.of(params.storage, "sft", fingerprint)  # storage.resume_uri
    resumed = checkpoint.load_state(resume_dir, fingerprint=fingerprint, objects=resumable, generator=generator,
                                    remote=remote)
    start, history = resumed if resumed else (0, {"loss": []})
    if resumed:
        if main:
            print(f"sft: resuming from step {start} ({resume_dir})")
        if ema:  # the state was loaded onto the CPU; the EMA's shadow weights follow the model
            ema.to(device=device)

    # Only the main process opens an MLflow run, logs, and writes outputs and resume state.
    with tracking.stage_run("sft", params, SECTIONS, root) if main else contextlib.nullcontext() as run:
        if main:
            mlflow.set_tag("restorl.resumed_from_step", str(start))
            mlflow.log_params({"n_params": sum(p.numel() for p in model.unet.parameters()),
                               "n_trained_params": sum(p.numel() for p in trained)})
        t0 = time.perf_counter()
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", unit="step",
                   disable=not main)
        for step, batch in zip(bar, _batches(params, pairs, mine, start, device)):
            gt, lq, rows = batch["gt"].to(device), batch["lq"].to(device), batch["row"]
            tasks = [pairs.tasks[i] for i in rows.tolist()]
            loss = (model.sft_loss(gt, lq, generator, tasks=tasks, shard=shard) * weights[rows.to(device)]).mean()
            global_loss = distributed.mean(loss.detach())  # the loss of the global batch
            checkpoint.ensure_finite(global_loss, "sft", f"step {step + 1}", resume_dir)
            backward_and_step(loss, optimizer, trained, cfg.grad_clip, scaler, distributed.average_gradients)
            lr_schedule.step()
            if ema:
                ema.step(trained)
            history["loss"].append(global_loss.item())
            done = step + 1
            if main and (done % cfg.log_every == 0 or done == cfg.steps):
                recent = sum(history["loss"][-cfg.log_every:]) / len(history["loss"][-cfg.log_every:])
                bar.set_postfix(loss=f"{recent:.4g}")
                mlflow.log_metric("train_loss", recent, step=done)
            if main and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint.save_state(resume_dir, fingerprint=fingerprint, step=done, objects=resumable,
                                      generator=generator, stats=history, remote=remote)
        seconds = time.perf_counter() - t0

        if ema:
            ema.copy_to(trained)
        version = _publish(params, root, model, history, seconds, run) if main else None
    if main:
        checkpoint.clear_state(resume_dir, remote)
        print(f"sft: {cfg.steps} steps in {seconds:.0f}s, final loss {history['loss'][-1]:.4g}; "
              f"registered {params.tracking.registered_model} v{version}")
    return {"steps": cfg.steps, "seconds": seconds, "model_version": version}


def _batches(params: Params, pairs: PatchPairs, rows: slice, start: int, device: torch.device):
    """The training batches from step `start` on: this process's `rows` of each global batch,
    drawn apart from the reading (TrainingDraws, a seed of its own derived from runtime.seed),
    read by `runtime.loader_workers` DataLoader workers into pinned memory on CUDA."""
    cfg = params.sft
    seed = int(np.random.SeedSequence([params.runtime.seed, DRAWS_STREAM]).generate_state(1)[0])
    draws = TrainingDraws(len(pairs), cfg.batch_size, cfg.steps, seed, augment=cfg.augment,
                          patch=params.prepare.patch_size, crop=cfg.crop_size, scale=pairs.lq_scale,
                          rows=rows, start=start)
    return torch.utils.data.DataLoader(pairs, batch_sampler=draws, num_workers=params.runtime.loader_workers,
                                       pin_memory=device.type == "cuda")


DRAWS_STREAM = 1  # the training draws' seed is runtime.seed's stream 1 (the noise uses runtime.seed itself)


def _publish(params: Params, root: Path, model, history: dict, seconds: float, run) -> str:
    """The main process's outputs: the model folder, the loss plot, MLflow metrics and a new
    registered version (returned)."""
    paths = Paths(root)
    with atomic_dir(paths.sft_model) as tmp:
        model.save_pretrained(tmp)
    _write_loss_plot(paths.plots / "sft_loss.csv", history["loss"], params.sft.log_every)
    mlflow.log_metric("train_seconds", seconds)
    mlflow.log_artifact(str(paths.plots / "sft_loss.csv"))
    return register_restorer(params, paths.sft_model, {
        "restorl.stage": "sft", "restorl.params_hash": params.section_hash(*SECTIONS),
        "restorl.data_hash": checkpoint.file_hash(paths.manifest), "restorl.git_commit": tracking.git_commit(root),
        "restorl.run_id": run.info.run_id}, paths.pretrained)


def _write_loss_plot(path: Path, losses: list[float], every: int) -> None:
    """Loss averaged over each `every` steps, for `dvc plots`."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        for end in range(every, len(losses) + every, every):
            window = losses[end - every:end]
            writer.writerow([min(end, len(losses)), f"{sum(window) / len(window):.6g}"])
