"""How far each hack control moves realism when applied to GT itself, by statistic group.

    python bench/realism_controls.py [--split val] [--quantise]

Run in a workspace whose `data/prepared` exists (`restorl prepare`). A realism measure should
barely move under an edit nobody can see (a 1/255 dither, a 5 % contrast stretch) and move far
under one anybody can (a 3x3 blur, the LQ itself). For the split's GT patches, each control is
applied to GT and scored with the `evaluate` stage's realism (kernel MMD^2 x 100 against the
unedited GT, per task, averaged), once with all statistics and once with each group of
`pipeline/rewards/realism.py`'s STATISTIC_GROUPS alone. `--quantise` rounds the edited images
to 8 bits first, as a saved PNG would be. Settings are chosen on val or train, never on test.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.data.dataset import load_split
from pipeline.errors import UserError
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.realism import STATISTIC_GROUPS, Realism, statistics


def to_8_bit(images: torch.Tensor) -> torch.Tensor:
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["train", "val", "test"], default="val")
    parser.add_argument("--quantise", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        split = load_split("data/prepared", args.split)
    except (UserError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    generator = torch.Generator().manual_seed(0)
    edited = {name: hack(split.gt, generator) for name, hack in HACKS.items()}
    edited["lq"] = split.lq_full
    if args.quantise:
        edited = {name: to_8_bit(images) for name, images in edited.items()}
    gt_stats = statistics(split.gt)
    edited_stats = {name: statistics(images) for name, images in edited.items()}
    groups = {"all": range(gt_stats.shape[1]), **STATISTIC_GROUPS}
    print(f"{args.split}: {len(split.gt)} GT patches; realism (x 100, lower is closer) of GT edited by each control")
    print("| statistics | " + " | ".join(edited) + " |")
    print("|---|" + "---|" * len(edited))
    for group, columns in groups.items():
        columns = list(columns)
        realism = Realism(gt_stats[:, columns], split.tasks)
        row = [f"{realism.distance(stats[:, columns]):.3f}" for stats in edited_stats.values()]
        print(f"| {group} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
