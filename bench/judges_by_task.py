"""How the learned reward and the held-out judge rank GT, LQ, SFT and RL, per task; and, with
--edits, what simple edits of the SFT output do to realism and both scores.

    python bench/judges_by_task.py [--profile P] [--benchmark NAME] [--tasks ...] [--edits]

Run in a workspace where the pipeline has run (checkpoints/sft, rl, reward and judge). Restores
the test split (or the benchmark folder NAME of `evaluate.benchmarks`) with SFT and RL at
`evaluate.sampling`, as `evaluate` does (bench/realism_by_group.py), and prints per task, for
each model: the share of patches it scores GT above LQ, above SFT and above RL, and the mean
score differences GT - SFT and RL - SFT. A judge that scores SFT above GT on a task cannot tell
whether RL improved it there. With --edits, per task: realism (as `evaluate` reports it; lower
is closer to GT) and each model's mean score change from SFT for GT, RL and edits of SFT: its
brightness matched to GT's by a gain or by an offset, its fine detail (5x5 binomial high-pass)
replaced by GT's, and its high-pass scaled by 0.8 (a mild smoothing). The restorations' noise
is drawn per batch, so a --tasks subset restores its patches differently from the whole set.
Prints figures only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from realism_by_group import data_arguments, restored

from pipeline.errors import UserError
from pipeline.models.reward_model import RewardModel, high_pass
from pipeline.paths import Paths
from pipeline.rewards.realism import Realism, statistics


def edits(gt: torch.Tensor, sft: torch.Tensor, rl: torch.Tensor) -> dict[str, torch.Tensor]:
    """GT, RL and edits of SFT, in [-1, 1]."""
    def mean(x):
        return x.mean(dim=(1, 2, 3), keepdim=True)

    gain = (mean(gt) + 1) / (mean(sft) + 1)  # brightness as the mean in [0, 1] units
    return {"gt": gt, "rl": rl, "sft, gain to GT's mean": (sft + 1) * gain - 1,
            "sft, offset to GT's mean": sft - mean(sft) + mean(gt),
            "sft, GT's high-pass": sft - high_pass(sft) + high_pass(gt),
            "sft, high-pass x 0.8": sft - 0.2 * high_pass(sft)}


def main() -> None:
    parser = data_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--edits", action="store_true", help="also the edits table")
    args = parser.parse_args()
    paths = Paths(Path("."))
    try:
        missing = [str(p) for p in (paths.reward_model, paths.judge_model) if not p.exists()]
        if missing:
            raise UserError(f"{', '.join(missing)}: missing; run the reward and judge stages first")
        data, outputs = restored(args)
    except (UserError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    models = {"reward": RewardModel.load(paths.reward_model), "judge": RewardModel.load(paths.judge_model)}
    images = {"gt": data.gt, "lq": data.lq_full, "sft": outputs["sft"], "rl": outputs["rl"]}
    with torch.no_grad():
        scores = {m: {k: model(v) for k, v in images.items()} for m, model in models.items()}
    tasks = sorted(set(data.tasks))
    rows = {t: torch.tensor([i for i, x in enumerate(data.tasks) if x == t]) for t in tasks}
    rows["all"] = torch.arange(len(data.tasks))
    print("| task | patches | " + " | ".join(f"{m}: GT>LQ | GT>SFT | GT>RL | GT-SFT | RL-SFT" for m in models) + " |")
    print("|---|---|" + "---|" * 5 * len(models))
    for task, r in rows.items():
        cells = []
        for m in models:
            gt, lq, sft, rl = (scores[m][k][r] for k in ("gt", "lq", "sft", "rl"))
            cells += [f"{(gt > lq).float().mean():.2f}", f"{(gt > sft).float().mean():.2f}",
                      f"{(gt > rl).float().mean():.2f}", f"{(gt - sft).mean():+.2f}", f"{(rl - sft).mean():+.2f}"]
        print(f"| {task} | {len(r)} | " + " | ".join(cells) + " |")
    if not args.edits:
        return
    print("\n| task | image | realism | " + " | ".join(f"{m} - SFT" for m in models) + " |")
    print("|---|---|---|" + "---|" * len(models))
    for task in tasks:
        r = rows[task]
        gt, sft = data.gt[r], outputs["sft"][r]
        realism = Realism(statistics(gt), [task] * len(r))
        with torch.no_grad():
            base = {m: model(sft) for m, model in models.items()}
            for name, image in {"sft": sft, **edits(gt, sft, outputs["rl"][r])}.items():
                image = image.clamp(-1, 1)
                change = [f"{float((model(image) - base[m]).mean()):+.3f}" for m, model in models.items()]
                print(f"| {task} | {name} | {realism.distance(statistics(image)):.3f} | " + " | ".join(change) + " |")


if __name__ == "__main__":
    main()
