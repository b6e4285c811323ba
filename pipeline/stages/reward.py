"""`reward`: train restorl's no-reference IQA reward model on its own data.

The training patches are the train split's; the SFT model restores them as `evaluate` would, and
pipeline/rewards/training.py trains the model from ranked pairs (GT over LQ, GT over the SFT
output, the SFT output over its hack controls, ...; the Bradley-Terry ranking loss of RankIQA:
Liu et al., "RankIQA: Learning from Rankings for No-reference Image Quality Assessment", 2017).
The acceptance checks (GT above LQ, GT above the SFT output, every hack control below SFT) are
computed on the held-out val split: every figure in checkpoints/reward/checks.json, the headline
(the two rates, how many hack controls beat SFT, passed) in metrics/reward.json; docs/results.md has the
measurements behind this design. The `judge` stage trains a second model the same way on images
neither this stage nor RL sees.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import numpy as np
import torch

from pipeline import distributed, tracking
from pipeline.atomic import atomic_dir, atomic_file
from pipeline.config import Params, flatten
from pipeline.data.dataset import load_split
from pipeline.device import setup_runtime
from pipeline.models.loading import load_restorer
from pipeline.models.sampling import restore
from pipeline.paths import Paths
from pipeline.rewards.checks import CHECKS_FILE, headline
from pipeline.rewards.training import fresh_degradations, reward_checks, train_reward_model

SECTIONS = ["reward"]


def run(params: Params, root: Path = Path(".")) -> dict:
    """Train; under a launcher (WORLD_SIZE > 1) every process runs this: the SFT restorations
    are shared among the processes, `reward.batch_size` is the global batch and each process
    scores its rows of it (docs/distributed.md); the main process checks, writes and logs."""
    per_rank = distributed.per_rank_batch(params.reward.batch_size, "reward.batch_size")
    with distributed.session(setup_runtime(params.runtime)) as device:
        return _train(params, Paths(root), device, per_rank)


def _train(params: Params, paths: Paths, device: torch.device, per_rank: int) -> dict:
    cfg, main = params.reward, distributed.is_main()
    sft = load_restorer(paths.sft_model, params.storage, paths.pretrained).to(device).eval()
    train, val = load_split(paths.data, "train"), load_split(paths.data, "val")
    generator = torch.Generator().manual_seed(params.runtime.seed)  # the same draws on every rank
    subset = torch.randperm(len(train), generator=generator)[: cfg.sft_samples]
    train = train.subset(subset)
    # The training patches restored as `reward.sft_sampling` says, their noise from a stream of
    # their own; val as `evaluate` restores it (exactly the outputs RL validates against).
    # Batches shared among the processes.
    sampling, batch, seed = params.evaluate.sampling, params.evaluate.batch_size, params.runtime.seed
    train_sft = restore(sft, train, cfg.sft_sampling, batch, (seed, TRAIN_RESTORATIONS), progress=True, shared=True)
    val_sft = restore(sft, val, sampling, batch, seed, progress=True, shared=True)
    rng = np.random.default_rng(seed)
    fresh = [fresh_degradations(train.gt, rng) for _ in range(cfg.fresh_negatives)]
    with tracking.stage_run("reward", params, SECTIONS, paths.root) if main else contextlib.nullcontext():
        model = train_reward_model(cfg, train, train_sft, fresh, generator, device, per_rank, "reward",
                                   paths.resume / "reward")
        if not main:
            return {}
        checks = reward_checks(model, val, val_sft, generator)
        mlflow.log_metrics({k: float(v) for k, v in flatten(checks).items() if not isinstance(v, bool)})
        with atomic_dir(paths.reward_model) as tmp:
            model.save(tmp)
            (tmp / CHECKS_FILE).write_text(json.dumps(checks, indent=2))
        with atomic_file(paths.metrics / "reward.json") as tmp:
            tmp.write_text(json.dumps(headline(checks), indent=2))
        mlflow.log_artifact(str(paths.reward_model / CHECKS_FILE))
    print(json.dumps(checks, indent=2))
    return checks


TRAIN_RESTORATIONS = 1  # the noise stream of the training patches' SFT restorations
