"""`rl`: difficulty-adaptive RL fine-tuning of the SFT restorer from the learned IQA reward.

One loop, in epochs of two phases (as in DDPO), whose parts the config picks by name:
  sampling   draw `images_per_epoch` scored training images (hard ones oversampled if asked),
             G rollouts each (DDIM, eta > 0), the reward of the predicted clean image at each
             checkpoint of `reward_steps`, group-normalised advantages per checkpoint, turned
             into per-step advantages by `step_credit` and scaled by `step_weighting`; each
             image's difficulty is refreshed from its rollouts and sets its RL weight w
             (`difficulty.weighting`).
  training   `inner_epochs` passes over minibatches: the `objective` (PPO clipped ratio on a
             random share of the stochastic steps, or reward feedback through one step),
             closed-form KL to the frozen SFT model, the `regularizers`, the SFT loss;
             per sample w * L_RL + (1 - w) * lambda_sft * L_SFT + beta * KL + regularizers.
             The seed methods are combinations of these parts (docs/rl_methods.md).
  validation val reward and PSNR (`evaluate.sampling`); the epoch with the best reward gain
             over SFT whose PSNR fell by at most `psnr_guard` dB is what ships (epoch 0 is
             the SFT model itself), so a run that starts hacking the reward is not shipped.
Resumable per epoch: model, optimiser, RNG, difficulty statistics, history and best-so-far go
to `checkpoints/resume/rl/`. Output: `checkpoints/rl` (diffusers folder), `metrics/rl.json`,
`plots/rl_curves.csv`, an MLflow run, and a new registered version with alias `challenger`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline import checkpoint, iqa, tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params, RlConfig
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.data.sources import DataError
from pipeline.device import setup_runtime
from pipeline.models.restorer import DiffusionRestorer
from pipeline.paths import Paths
from pipeline.rewards.scorers import LearnedScorer, PyiqaScorer, Reward, RewardError, Term
from pipeline.rl.advantages import group_advantages, zero_variance_share
from pipeline.rl.credit import STEP_CREDIT, STEP_WEIGHTING
from pipeline.rl.difficulty import WEIGHTINGS, DifficultyTracker, draw_images, mixed_loss
from pipeline.rl.objectives import OBJECTIVES
from pipeline.rl.rollout import Rollouts, collect
from pipeline.stages.evaluate import restore
from pipeline.stages.score import load_reward, measure, read_table

SECTIONS = ["rl", "score"]


def run(params: Params, root: Path = Path(".")) -> dict:
    cfg, paths = params.rl, Paths(root)
    device = setup_runtime(params.runtime)
    train = load_split(paths.data, "train")
    pool, pool_difficulty = read_table(paths.difficulty_table, train)
    if cfg.images_per_epoch > len(pool):
        raise DataError(f"rl.images_per_epoch={cfg.images_per_epoch} exceeds the {len(pool)} scored samples "
                        f"in {paths.difficulty_table} (score.samples)")
    val = evenly_spaced(load_split(paths.data, "val"), cfg.val_images)
    model = DiffusionRestorer.from_pretrained(paths.sft_model).to(device)
    reference = model.reference()
    reward = load_reward(params, paths, device)
    # Reward feedback needs the reward's gradient; the rollouts' rewards stay the plain ones.
    feedback = differentiable_reward(params, paths, device) if cfg.objective == "refl" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(params.runtime.seed if cfg.seed is None else cfg.seed)
    tracker = DifficultyTracker(pool_difficulty, cfg.difficulty.window)
    resumable = {"model": model, "optimizer": optimizer, "tracker": tracker}

    resume_dir = paths.resume / "rl"
    fingerprint = _fingerprint(params, paths)
    resumed = checkpoint.load_state(resume_dir, fingerprint=fingerprint, objects=resumable, generator=generator)
    if resumed:
        start, stats = resumed
        print(f"rl: resuming from epoch {start} ({resume_dir})")
    else:
        start = 0
        baseline = validate(model, reward, val, params, device)
        stats = {"difficulty": pool_difficulty.clone(), "history": [], "baseline": baseline,
                 "best": {"epoch": 0, "gain": 0.0, "val": baseline, "weights": _weights(model)}}

    with tracking.stage_run("rl", params, SECTIONS, root) as active:
        mlflow.set_tag("restorl.resumed_from_epoch", str(start))
        mlflow.log_metrics({"val_reward": stats["baseline"]["reward"], "val_psnr": stats["baseline"]["psnr"]}, step=0)
        t0 = time.perf_counter()
        bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, desc="rl", unit="epoch")
        for epoch in bar:
            # ---- sampling: rollouts, rewards at the checkpoints, advantages, difficulty weights
            picked = draw_images(stats["difficulty"], cfg.images_per_epoch, cfg.difficulty.oversample, generator)
            idx = pool[picked]
            model.eval()
            r = collect(model, train.lq[idx].to(device), train.gt[idx].to(device), [train.tasks[i] for i in idx.tolist()],
                        cfg.group_size, cfg.steps, cfg.eta, generator)
            rewards = checkpoint_rewards(reward, r, cfg.reward_steps)
            adv_k = torch.stack([group_advantages(rw.view(-1, cfg.group_size), cfg.advantage_clip,
                                                  std_scope=cfg.advantage_std).flatten() for rw in rewards])
            advantages = per_step_advantages(adv_k, r, cfg)
            fresh = measure(reward, r.images, r.gt, params.score.fidelity_weight)["difficulty"]
            fresh = fresh.view(-1, cfg.group_size).mean(dim=1)
            w = WEIGHTINGS[cfg.difficulty.weighting](tracker, fresh, cfg.difficulty.q_lo, cfg.difficulty.q_hi)
            tracker.update(fresh)
            stats["difficulty"][picked] = fresh

            # ---- training: the objective + KL + regularizers on the recorded steps, SFT on the same images
            model.train()
            losses = train_on_rollouts(model, reference, optimizer, r, advantages,
                                       w.repeat_interleave(cfg.group_size).to(device), cfg, generator, feedback)

            # ---- validation and best-so-far
            result = validate(model, reward, val, params, device)
            gain, drop = result["reward"] - stats["baseline"]["reward"], stats["baseline"]["psnr"] - result["psnr"]
            if drop <= cfg.psnr_guard and gain > stats["best"]["gain"]:
                stats["best"] = {"epoch": epoch + 1, "gain": gain, "val": result, "weights": _weights(model)}
            record = epoch_record(epoch + 1, rewards, cfg.reward_steps, cfg.group_size, advantages, losses, w,
                                  tracker, result, gain, drop, cfg.kl_beta)
            stats["history"].append(record)
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            bar.set_postfix(reward=f"{record['reward.final.mean']:.3g}", val_psnr=f"{result['psnr']:.2f}",
                            kl=f"{record['kl']:.2g}")
            if epoch + 1 < cfg.epochs:
                checkpoint.save_state(resume_dir, fingerprint=fingerprint, step=epoch + 1, objects=resumable,
                                      generator=generator, stats=stats)
        seconds = time.perf_counter() - t0

        best = stats["best"]
        model.unet.load_state_dict(best["weights"])
        with atomic_dir(paths.rl_model) as tmp:
            model.save_pretrained(tmp)
        summary = {"epochs": cfg.epochs, "rollouts": cfg.epochs * cfg.images_per_epoch * cfg.group_size,
                   "seconds": round(seconds, 1), "best_epoch": best["epoch"],
                   "val": {"sft": stats["baseline"], "rl": best["val"]},
                   "val_reward_gain": round(best["gain"], 6),
                   "val_psnr_drop": round(stats["baseline"]["psnr"] - best["val"]["psnr"], 4),
                   "final_epoch": stats["history"][-1] if stats["history"] else None}
        with atomic_file(paths.metrics / "rl.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        write_curves(paths.plots / "rl_curves.csv", stats["history"])
        mlflow.log_metrics({"train_seconds": seconds, "best_epoch": best["epoch"]})
        for path in (paths.metrics / "rl.json", paths.plots / "rl_curves.csv"):
            mlflow.log_artifact(str(path))
        version = tracking.register_restorer(params, paths.rl_model, {
            "restorl.stage": "rl", "restorl.params_hash": params.section_hash(*SECTIONS),
            "restorl.data_hash": _data_hash(paths), "restorl.git_commit": tracking.git_commit(root),
            "restorl.run_id": active.info.run_id, "restorl.best_epoch": str(best["epoch"])})
    checkpoint.clear_state(resume_dir)
    print(f"rl: {cfg.epochs} epochs ({summary['rollouts']} rollouts) in {seconds:.0f}s; best epoch "
          f"{best['epoch']}: val reward {best['val']['reward']:.4g} (SFT {stats['baseline']['reward']:.4g}), "
          f"val PSNR {best['val']['psnr']:.2f} (SFT {stats['baseline']['psnr']:.2f}); "
          f"registered {params.tracking.registered_model} v{version}")
    return summary | {"model_version": version}


def checkpoint_rewards(reward: Reward, r: Rollouts, checkpoints: list[int]) -> torch.Tensor:
    """(K, N) rewards of the clean image predicted after k steps, for each checkpoint k."""
    steps = len(r.timesteps)
    with torch.no_grad():
        return torch.stack([reward(r.images if k == steps else r.x0[k].clamp(-1, 1), r.gt) for k in checkpoints]).cpu()


def per_step_advantages(adv_k: torch.Tensor, r: Rollouts, cfg: RlConfig) -> torch.Tensor:
    """(S, N) advantages: checkpoint advantages through `step_credit`, then `step_weighting`."""
    credit_options = {"coca": cfg.coca.model_dump()}.get(cfg.step_credit, {})
    advantages = STEP_CREDIT[cfg.step_credit](adv_k, cfg.reward_steps, r, **credit_options)
    return STEP_WEIGHTING[cfg.step_weighting](advantages, r, **cfg.noise_level.model_dump())


def differentiable_reward(params: Params, paths: Paths, device: torch.device) -> Reward:
    """`rl.reward` with gradients: the learned model as it is, pyiqa metrics as losses (their
    weights from the local cache, as for the plain reward). A term without a gradient is an
    error naming it."""
    weights_dir = Path(params.storage.weights_dir) if params.storage.weights_dir else None
    terms = []
    for name, weight in params.rl.reward.items():
        if name == "learned":
            scorer = LearnedScorer(paths.reward_model, device)
        else:
            scorer = PyiqaScorer(name, device, weights_dir, as_loss=True)
            # As a loss pyiqa averages over the batch by default; the update needs per-image values.
            scorer.metric.loss_reduction = "none"
        terms.append(Term(name, weight, scorer))
    size = params.prepare.patch_size
    probe = torch.zeros(2, 3, size, size, device=device, requires_grad=True)
    for term in terms:
        scores = term.scorer(probe, probe.detach() + 0.1)
        if not scores.requires_grad or scores.shape != (2,):
            raise RewardError(f"rl.reward term '{term.name}' gives no per-image gradient; "
                              "rl.objective: refl needs a differentiable reward")
    return Reward(terms)


def train_on_rollouts(model: DiffusionRestorer, reference: DiffusionRestorer, optimizer: torch.optim.Optimizer,
                      r: Rollouts, advantages: torch.Tensor, w: torch.Tensor, cfg: RlConfig,
                      generator: torch.Generator, reward: Reward | None = None) -> dict[str, float]:
    """The update phase; returns mean RL/SFT losses, KL, the clipped share of ratios and,
    with regularizers, their mean. `reward`: the differentiable reward (refl objective)."""
    advantages = advantages.to(r.lq.device)
    objective = OBJECTIVES[cfg.objective]
    # With w = 1 for everyone the SFT term is multiplied by 0: do not pay for it.
    with_sft = cfg.difficulty.weighting != "rl_only"
    totals = {"loss_rl": 0.0, "loss_sft": 0.0, "kl": 0.0, "clip_frac": 0.0}
    if cfg.regularizers:
        totals["loss_reg"] = 0.0
    updates = 0
    for _ in range(cfg.inner_epochs):
        for mb in torch.randperm(r.lq.shape[0], generator=generator).split(cfg.minibatch):
            terms = objective(model, reference, r, mb, advantages, cfg, generator, reward)
            tasks = [r.tasks[i] for i in mb.tolist()] if r.tasks else None
            l_sft = model.sft_loss(r.gt[mb], r.lq[mb], generator, tasks=tasks) if with_sft else torch.zeros(len(mb))
            per_sample = mixed_loss(w[mb], terms.rl, l_sft.to(w.device), cfg.difficulty.lambda_sft) + cfg.kl_beta * terms.kl
            if cfg.regularizers:
                per_sample = per_sample + terms.regularizers
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step_values = {"loss_rl": _mean(terms.rl), "loss_sft": _mean(l_sft), "kl": _mean(terms.kl),
                           "clip_frac": terms.clip_frac, "loss_reg": _mean(terms.regularizers)}
            for key in totals:
                totals[key] += step_values[key]
            updates += 1
    return {k: v / updates for k, v in totals.items()}


def _mean(value: torch.Tensor | float) -> float:
    return float(value.detach().mean()) if torch.is_tensor(value) else float(value)


def validate(model: DiffusionRestorer, reward: Reward, val: PairedSplit, params: Params,
             device: torch.device) -> dict[str, float]:
    """Mean reward and PSNR of the val restorations (deterministic: `evaluate.sampling`, fixed seed)."""
    restored = restore(model, val, params, device, progress=False)
    with torch.no_grad():
        r = reward(restored.to(device), val.gt.to(device))
    return {"reward": round(float(r.mean()), 6), "psnr": round(float(iqa.score("psnr", restored, val.gt).mean()), 4)}


def epoch_record(epoch: int, rewards: torch.Tensor, checkpoints: list[int], group_size: int,
                 advantages: torch.Tensor, losses: dict[str, float], w: torch.Tensor, tracker: DifficultyTracker,
                 val: dict[str, float], gain: float, drop: float, kl_beta: float) -> dict[str, float]:
    """Everything logged per epoch (MLflow metrics and plots/rl_curves.csv)."""
    record: dict[str, float] = {"epoch": epoch}
    for k, rw in zip(checkpoints, rewards):
        name = "final" if k == checkpoints[-1] else f"step{k}"
        record |= {f"reward.{name}.mean": float(rw.mean()), f"reward.{name}.std": float(rw.std())}
    q = torch.quantile(tracker.values, torch.tensor([0.1, 0.5, 0.9])).tolist()
    mean_adv = float(advantages.abs().mean())
    record |= {
        "zero_variance_share": zero_variance_share(rewards[-1].view(-1, group_size)),
        **losses,
        # beta * KL's pull on the step mean relative to the policy gradient's push: about
        # beta * sqrt(2 KL) / mean|A| (both gradients scale with 1 / (sigma^2 * pixels)).
        "kl_pull": kl_beta * math.sqrt(2 * max(losses["kl"], 0.0)) / max(mean_adv, 1e-8),
        "difficulty.q10": q[0], "difficulty.q50": q[1], "difficulty.q90": q[2],
        "weight_rl": float(w.mean()), "weight_sft": float(1 - w.mean()),
        "val_reward": val["reward"], "val_psnr": val["psnr"], "val_reward_gain": gain, "val_psnr_drop": drop,
    }
    return record


def evenly_spaced(data: PairedSplit, n: int) -> PairedSplit:
    """At most `n` samples spread over the split (which is ordered by source and task draw)."""
    if n >= len(data):
        return data
    idx = torch.linspace(0, len(data) - 1, n).round().long()
    return PairedSplit(data.gt[idx], data.lq[idx], [data.samples[i] for i in idx.tolist()])


def write_curves(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _weights(model: DiffusionRestorer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.unet.state_dict().items()}


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _data_hash(paths: Paths) -> str:
    return _file_hash(paths.manifest, paths.difficulty_table)


def _fingerprint(params: Params, paths: Paths) -> str:
    """What a resumable state depends on: settings, data, the SFT and reward models."""
    settings = params.section_hash(*SECTIONS, "runtime", "evaluate")
    return f"{settings}-{_data_hash(paths)}-{_file_hash(paths.sft_model, paths.reward_model)}"
