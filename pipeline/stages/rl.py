"""`rl`: difficulty-adaptive RL fine-tuning of the SFT restorer from the learned IQA reward.

One loop, whose parts the config picks by name (pipeline/rl/parts.py, docs/rl_methods.md):
each epoch samples rollouts and their rewards, updates the model on them, validates it on val,
and keeps the best epoch so far (pipeline/rl/loop.py has the phases). The epoch with the best
val reward gain over SFT whose PSNR fell by at most `psnr_guard` dB (overall and on every task)
and whose score by the held-out judge (checkpoints/judge) fell by at most `judge_guard` is what
ships (epoch 0 is the SFT model itself), so a run that starts hacking the reward is not shipped.
The judge only vetoes epochs on val; it is never a reward.
Resumable per epoch: model, optimiser, RNG, difficulty statistics, history and best-so-far go
to `checkpoints/resume/rl/`. Output: `checkpoints/rl` (diffusers folder), `metrics/rl.json` (the
headline: budget, time, best epoch, its val reward gain and PSNR drops, the registered version),
`plots/rl_curves.csv` (val figures per epoch; SFT's at step 0 in MLflow), an MLflow run, and a new registered version with alias `challenger`.

Many processes (`torchrun --nproc_per_node N -m pipeline.cli rl`; docs/distributed.md):
`rl.images_per_epoch` and `rl.minibatch` are global, multiples of N. Every rank draws the epoch's
images and all rollouts' noise from the same seeded generator and samples the groups of its
images; rewards, difficulties and rollouts are gathered (pipeline/rl/sharding.py), so advantages,
difficulty statistics and logs are the global ones; each rank trains on an equal share of every
minibatch and steps on the gradients averaged over the ranks. Rank 0 validates and sends its
figures to all, so all select the same epoch; only it logs to MLflow and writes outputs and the
resume state, which every rank reads. N processes end with one process's weights (to rounding).
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline import checkpoint, distributed, tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.data.sources import DataError
from pipeline.device import grad_scaler, setup_runtime
from pipeline.model_registry import register_restorer
from pipeline.models.loading import model_for_rl
from pipeline.models.restorer import Restorer
from pipeline.models.reward_model import WEIGHTS as JUDGE_WEIGHTS
from pipeline.paths import Paths
from pipeline.rewards.checks import require_passed
from pipeline.rewards.scorers import Reward, RewardError, build_reward, load_reward
from pipeline.rl import loop, parts, sharding
from pipeline.rl.difficulty import DifficultyTracker
from pipeline.rl.difficulty_table import read_table
from pipeline.stage_code import code_hash

SECTIONS = ["rl", "score"]


@dataclass
class Setup:
    """Everything the epochs work with."""

    pool: loop.Pool
    val: PairedSplit
    model: Restorer
    reference: Restorer | None  # the frozen SFT model, when the parts need it
    reward: Reward  # the reward rollouts and validation are scored with
    judge: Reward | None  # the held-out judge validation is also scored with (rl.judge_guard)
    feedback: Reward | None  # the same with gradients, when the objective needs it
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    tracker: DifficultyTracker
    scaler: torch.amp.GradScaler  # fp16 loss scaling (a pass-through for other precisions)


def run(params: Params, root: Path = Path(".")) -> dict:
    """Train; under a launcher (WORLD_SIZE > 1) every process runs this (module docstring)."""
    cfg, paths = params.rl, Paths(root)
    picked = parts.pick(cfg)
    reward_failures = require_passed(paths.reward_model, cfg.allow_failed_reward_checks) \
        if "learned" in cfg.reward else []
    if cfg.judge_guard is not None and not (paths.judge_model / JUDGE_WEIGHTS).exists():
        raise RewardError(f"rl.judge_guard is {cfg.judge_guard} but there is no held-out judge at "
                          f"{paths.judge_model / JUDGE_WEIGHTS}: run `restorl judge` first, or set "
                          "rl.judge_guard: null to select epochs without it")
    # Checked before any process group starts: whole groups on each rank, equal shares of each minibatch.
    distributed.per_rank_batch(cfg.images_per_epoch, "rl.images_per_epoch")
    distributed.per_rank_batch(cfg.minibatch, "rl.minibatch")
    with distributed.session(setup_runtime(params.runtime)) as device:
        return _train(params, paths, picked, device, reward_failures)


def _train(params: Params, paths: Paths, picked: parts.RlParts, device: torch.device,
           reward_failures: list[str]) -> dict:
    cfg, main = params.rl, distributed.is_main()
    s = setup(params, paths, picked, device)
    resume_dir = paths.resume / "rl"
    fingerprint = checkpoint.fingerprint(params, [*SECTIONS, "runtime", "evaluate"],
                                         [paths.manifest, paths.difficulty_table, paths.sft_model, paths.reward_model]
                                         + ([paths.judge_model] if cfg.judge_guard is not None else []),
                                         code_hash("rl"))
    resumable = {"model": s.model, "optimizer": s.optimizer, "tracker": s.tracker, "grad_scaler": s.scaler}
    remote = checkpoint.RemoteState.of(params.storage, "rl", fingerprint)  # storage.resume_uri
    # Every rank reads the state the main process wrote.
    resumed = checkpoint.load_state(resume_dir, fingerprint=fingerprint, objects=resumable, generator=s.generator,
                                    remote=remote)
    distributed.broadcast_(s.model.trainable_parameters())  # every rank goes on from the main process's weights
    if resumed:
        start, stats = resumed
        stats["best"] = loop.Selection(**stats["best"])  # saved as a plain dict (loaded weights_only)
        s.pool.difficulty = stats["difficulty"]
        if main:
            print(f"rl: resuming from epoch {start} ({resume_dir})")
    else:
        start, baseline = 0, validated(s, params).as_dict()
        stats = {"difficulty": s.pool.difficulty, "history": [], "baseline": baseline,
                 "best": loop.Selection(0, 0.0, baseline, s.model.trainable_state())}

    # Only the main process opens an MLflow run, logs, and writes outputs and resume state.
    with tracking.stage_run("rl", params, SECTIONS, paths.root) if main else contextlib.nullcontext() as active:
        if main:
            log_start(start, reward_failures, stats["baseline"])
        t0 = time.perf_counter()
        bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, desc="rl", unit="epoch",
                   disable=not main)
        for epoch in bar:
            record, result = run_epoch(params, s, picked, stats, epoch + 1, resume_dir)
            bar.set_postfix(reward=f"{record['reward.final.mean']:.3g}", val_psnr=f"{result.psnr:.2f}",
                            loss_rl=f"{record['loss_rl']:.2g}")
            if main:
                mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}
                                   | {f"val_psnr.{t}": v for t, v in result.task_psnr.items()}, step=epoch + 1)
            if main and epoch + 1 < cfg.epochs:
                checkpoint.save_state(resume_dir, fingerprint=fingerprint, step=epoch + 1, objects=resumable,
                                      generator=s.generator, stats=stats | {"best": asdict(stats["best"])},
                                      remote=remote)
        if not main:
            return {"epochs": cfg.epochs, "best_epoch": stats["best"].epoch}
        summary = save_outputs(params, paths, s.model, stats, time.perf_counter() - t0)
        version = register(params, paths, summary, stats["best"].epoch, active.info.run_id, paths.root)
    checkpoint.clear_state(resume_dir, remote)
    best = stats["best"]
    judged = (f"val judge {best.val['judge']:.4g} (SFT {stats['baseline']['judge']:.4g}), "
              if "val_judge_drop" in summary else "")
    print(f"rl: {cfg.epochs} epochs ({summary['rollouts']} rollouts) in {summary['seconds']:.0f}s; best epoch "
          f"{best.epoch}: val reward {best.val['reward']:.4g} (SFT {stats['baseline']['reward']:.4g}), "
          f"val PSNR {best.val['psnr']:.2f} (SFT {stats['baseline']['psnr']:.2f}), {judged}"
          f"registered {params.tracking.registered_model} v{version}")
    return summary


def run_epoch(params: Params, s: Setup, picked: parts.RlParts, stats: dict, epoch: int,
              resume_dir: Path) -> tuple[dict, loop.Validation]:
    """One epoch on every rank: sampling, update, validation, selection; its record (appended
    to stats["history"]) and its validation."""
    cfg = params.rl
    samples = loop.sample_epoch(s.model, s.pool, s.reward, s.tracker, picked, params, s.generator)
    losses = loop.train_on_rollouts(s.model, s.optimizer, samples, picked, cfg, s.generator,
                                    s.reference, s.feedback, epoch, resume_dir, s.scaler)
    result = validated(s, params)
    stats["best"] = loop.select(stats["best"], epoch, result, stats["baseline"], cfg.psnr_guard, s.model,
                                cfg.judge_guard)
    record = loop.epoch_record(epoch, samples, cfg.reward_steps, cfg.group_size, losses, s.tracker,
                               result, stats["baseline"], cfg.kl_beta)
    stats["history"].append(record)
    return record, result


def validated(s: Setup, params: Params) -> loop.Validation:
    """The val figures, computed by the main process and sent to every rank, so that all ranks
    select the same epoch (the others wait: the weights are the same on every rank)."""
    return sharding.broadcast_object(loop.validate(s.model, s.reward, s.val, params, s.judge)
                                     if distributed.is_main() else None)


def log_start(start: int, reward_failures: list[str], baseline: dict) -> None:
    mlflow.set_tag("restorl.resumed_from_epoch", str(start))
    if reward_failures:
        mlflow.set_tag("restorl.reward_checks_failed", "; ".join(reward_failures)[:5000])
    mlflow.log_metrics({"val_reward": baseline["reward"], "val_psnr": baseline["psnr"]}
                       | ({"val_judge": baseline["judge"]} if baseline.get("judge") is not None else {}), step=0)


def setup(params: Params, paths: Paths, picked: parts.RlParts, device: torch.device) -> Setup:
    """Data, models, rewards, optimiser and generator, loaded in a fixed order (the run is seeded)."""
    cfg = params.rl
    train = load_split(paths.data, "train")
    index, difficulty = read_table(paths.difficulty_table, train)
    if cfg.images_per_epoch > len(index):
        raise DataError(f"rl.images_per_epoch={cfg.images_per_epoch} exceeds the {len(index)} scored samples "
                        f"in {paths.difficulty_table} (score.samples)")
    val = loop.evenly_spaced(load_split(paths.data, "val"), cfg.val_images)
    model = model_for_rl(paths.sft_model, params.model, params.storage, paths.pretrained).to(device)
    reference = model.reference() if picked.needs_reference else None  # adapters off under LoRA: no copy
    reward = load_reward(params, paths, device)
    # Reward feedback needs the reward's gradient; the rollouts' rewards stay the plain ones.
    feedback = load_reward(params, paths, device, differentiable=True) if picked.needs_differentiable_reward else None
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(params.runtime.seed if cfg.seed is None else cfg.seed)
    tracker = DifficultyTracker(difficulty, cfg.difficulty.window)
    # Last, so that the other parts load as they do without a judge guard.
    judge = None if cfg.judge_guard is None else build_reward({"learned": 1.0}, device, learned_path=paths.judge_model)
    return Setup(loop.Pool(train, index, difficulty.clone()), val, model, reference, reward, judge, feedback,
                 optimizer, generator, tracker, grad_scaler(device))


def save_outputs(params: Params, paths: Paths, model: Restorer, stats: dict, seconds: float) -> dict:
    """The best epoch's model and plots/rl_curves.csv (logged to the active run); the summary
    `run` writes to metrics/rl.json once the model is registered."""
    cfg, best = params.rl, stats["best"]
    losses = loop.psnr_losses(loop.Validation(**best.val), stats["baseline"])
    worst, best_drop = max(((t, v) for t, v in losses.items() if t != "overall"), key=lambda tv: tv[1],
                           default=("overall", losses["overall"]))
    model.load_trainable_state(best.weights)
    with atomic_dir(paths.rl_model) as tmp:
        model.save_pretrained(tmp)
    summary = {"epochs": cfg.epochs, "rollouts": cfg.epochs * cfg.images_per_epoch * cfg.group_size,
               "seconds": round(seconds, 1), "best_epoch": best.epoch,
               "val_reward_gain": round(best.gain, 6),
               "val_psnr_drop": round(stats["baseline"]["psnr"] - best.val["psnr"], 4),
               "val_psnr_drop_worst_task": round(best_drop, 4), "worst_task": worst}
    if (judge_drop := loop.judge_drop(loop.Validation(**best.val), stats["baseline"])) is not None:
        summary["val_judge_drop"] = round(judge_drop, 6)
    write_curves(paths.plots / "rl_curves.csv", stats["history"])
    mlflow.log_metrics({"train_seconds": seconds, "best_epoch": best.epoch})
    mlflow.log_artifact(str(paths.plots / "rl_curves.csv"))
    return summary


def register(params: Params, paths: Paths, summary: dict, best_epoch: int, run_id: str, root: Path) -> str:
    """Register checkpoints/rl and write metrics/rl.json naming the version: the one promote
    judges (this run's, not whatever the `challenger` alias points at)."""
    tags = {"restorl.stage": "rl", "restorl.params_hash": params.section_hash(*SECTIONS),
            "restorl.data_hash": checkpoint.file_hash(paths.manifest, paths.difficulty_table),
            "restorl.git_commit": tracking.git_commit(root), "restorl.run_id": run_id,
            "restorl.best_epoch": str(best_epoch)}
    if "learned" in params.rl.reward:  # promote judges with the reward the model was trained on
        tags["restorl.reward_hash"] = checkpoint.file_hash(paths.reward_model)
    version = register_restorer(params, paths.rl_model, tags, paths.pretrained)
    summary["registered"] = {"model": params.tracking.registered_model, "version": version, "run_id": run_id}
    with atomic_file(paths.metrics / "rl.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    mlflow.log_artifact(str(paths.metrics / "rl.json"))
    return version


def write_curves(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
