"""Where SFT's and RL's outputs differ from GT, per task: brightness and realism by statistic group.

    python bench/realism_by_group.py [--profile P] [--benchmark NAME] [--tasks low_light rain_streaks]

Run in a workspace where the pipeline has run (checkpoints/sft and checkpoints/rl). Restores the
test split (or the benchmark folder NAME of `evaluate.benchmarks`, with --profile adding it) with
both models at `evaluate.sampling`, as `evaluate` does, and prints for each task: the mean luma of
GT, LQ, SFT and RL; the realism distance (x 100, lower is closer) of SFT and RL from GT with all
statistics and with each group of `pipeline/rewards/realism.py`'s STATISTIC_GROUPS alone; and
per group the mean shift of the outputs' statistics from GT's, in units of GT's spread (positive:
larger wavelet details, more of a gradient bin, brighter). Prints figures only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data.benchmarks import load_benchmark
from pipeline.data.dataset import load_split
from pipeline.errors import UserError
from pipeline.models.loading import load_restorer
from pipeline.models.sampling import restore
from pipeline.paths import Paths
from pipeline.rewards.realism import STATISTIC_GROUPS, Realism, luma, statistics


def mean_luma(images: torch.Tensor) -> float:
    return float(luma(images).mean())


def data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options `restored` reads: the params file, a profile, a benchmark and the tasks."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--benchmark", default=None, help="a name in evaluate.benchmarks; default the test split")
    parser.add_argument("--tasks", nargs="*", default=None, help="default every task")
    return parser


def main() -> None:
    parser = data_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    try:
        data, outputs = restored(args)
    except (UserError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    groups = {"all": range(statistics(data.gt[:2]).shape[1]), **STATISTIC_GROUPS}
    for task in sorted(set(data.tasks)):
        rows = torch.tensor([i for i, t in enumerate(data.tasks) if t == task])
        gt = data.gt[rows]
        stats = {name: statistics(images[rows]) for name, images in outputs.items()}
        gt_stats = statistics(gt)
        brightness = {"gt": mean_luma(gt), "lq": mean_luma(data.lq_full[rows])}
        brightness |= {name: mean_luma(images[rows]) for name, images in outputs.items()}
        print(f"\n{task} ({len(rows)} patches); mean luma " + ", ".join(f"{k} {v:.4f}" for k, v in brightness.items()))
        print("| statistics | realism SFT | realism RL | shift SFT (GT std) | shift RL (GT std) |")
        print("|---|---|---|---|---|")
        mean, spread = gt_stats.mean(0), gt_stats.std(0) + 1e-6
        for group, columns in groups.items():
            columns = list(columns)
            realism = Realism(gt_stats[:, columns], [task] * len(rows))
            shifts = {n: ((s.mean(0) - mean) / spread)[columns] for n, s in stats.items()}
            print(f"| {group} | " + " | ".join(f"{realism.distance(s[:, columns]):.3f}" for s in stats.values())
                  + " | " + " | ".join(" ".join(f"{x:+.2f}" for x in v.tolist()) if group != "all" else
                                        f"{float(v.abs().mean()):.2f} (mean abs)" for v in shifts.values()) + " |")


def restored(args: argparse.Namespace) -> tuple:
    """The split (or benchmark) cut to `args.tasks`, and its SFT and RL restorations."""
    params = load_params(args.params, args.profile)
    torch.set_num_threads(params.runtime.threads)
    paths = Paths(Path("."))
    if args.benchmark:
        if args.benchmark not in params.evaluate.benchmarks:
            raise UserError(f"--benchmark {args.benchmark}: not in evaluate.benchmarks of {args.params}"
                            + (f" with profile {args.profile}" if args.profile else "")
                            + f" (known: {sorted(params.evaluate.benchmarks)})")
        data = load_benchmark(args.benchmark, params.evaluate.benchmarks[args.benchmark], params.prepare,
                              params.runtime.seed)
    else:
        data = load_split(paths.data, "test")
    tasks = args.tasks or sorted(set(data.tasks))
    unknown = sorted(set(tasks) - set(data.tasks))
    if unknown:
        raise UserError(f"--tasks {' '.join(unknown)}: no such task in the data (known: {sorted(set(data.tasks))})")
    data = data.subset(torch.tensor([i for i, t in enumerate(data.tasks) if t in tasks]))
    sampling, batch, seed = params.evaluate.sampling, params.evaluate.batch_size, params.runtime.seed
    outputs = {name: restore(load_restorer(folder), data, sampling, batch, seed)
               for name, folder in (("sft", paths.sft_model), ("rl", paths.rl_model))}
    return data, outputs


if __name__ == "__main__":
    main()
