"""Training batches from the whole-split tensors vs the streaming DataLoader, on a prepared set
`--scale` times larger than the profile's: batches/s and the peak memory of each.

    python bench/data_loading.py [--params params.yaml] [--profile NAME] [--scale 10]
                                 [--steps 200] [--workers 0 2]

Prepares the larger set once in a temp folder (prepare.patches_per_image.train x scale), then
runs each way in its own process and reports how far its peak RSS rose above the imports (and,
with workers, each worker process's own peak). Prints figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipeline.config import load_raw, validate
from pipeline.data.dataset import PatchPairs, TrainingDraws, load_split


def whole(data_dir: Path, batch: int, steps: int, seed: int, workers: int) -> int:
    """As training did before streaming: the split in memory, batches indexed out of it."""
    train = load_split(data_dir, "train")
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=generator)
        seen += int(train.gt[idx].shape[0] + 0 * train.lq[idx].sum())
    return seen


def streamed(data_dir: Path, batch: int, steps: int, seed: int, workers: int) -> int:
    pairs = PatchPairs(data_dir, "train")
    patch = pairs.pair(0)[0].shape[-1]
    draws = TrainingDraws(len(pairs), batch, steps, seed, augment=True, patch=patch)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=draws, num_workers=workers)
    return sum(int(b["gt"].shape[0]) for b in loader)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(way: str, data_dir: str, batch: int, steps: int, workers: int) -> None:
    torch.set_num_threads(1)
    before = _peak_mb()  # after the imports: what every way pays
    t0 = time.perf_counter()
    n = {"whole": whole, "streamed": streamed}[way](Path(data_dir), batch, steps, 0, workers)
    seconds = time.perf_counter() - t0
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": n, "seconds": seconds, "grew_mb": _peak_mb() - before, "worker_mb": workers_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        way, data_dir, batch, steps, workers = args.child
        return child(way, data_dir, int(batch), int(steps), int(workers))

    raw = load_raw(Path(args.params), args.profile)
    raw["prepare"]["patches_per_image"]["train"] *= args.scale
    batch = validate(raw, args.params).sft.batch_size
    with tempfile.TemporaryDirectory(prefix="restorl-bench-") as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        # `restorl prepare` as a user runs it, its MLflow run in the temp folder's own store.
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        subprocess.run([str(Path(sys.executable).parent / "restorl"), "prepare"], cwd=tmp, env=env, check=True,
                       capture_output=True)
        data_dir = Path(tmp) / "data" / "prepared"
        n_train = len(PatchPairs(data_dir, "train"))
        print(f"train split: {n_train} patches of {raw['prepare']['patch_size']} px ({args.scale}x the profile's), "
              f"batch {batch}, {args.steps} steps")
        ways = [("whole", 0)] + [("streamed", w) for w in args.workers]
        for way, workers in ways:
            out = subprocess.run([sys.executable, __file__, "--child", way, str(data_dir), str(batch),
                                  str(args.steps), str(workers)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            label = way if way == "whole" else f"streamed, {workers} workers"
            print(f"{label:<22} {r['images'] / r['seconds']:8.0f} images/s   peak RSS +{r['grew_mb']:6.0f} MB "
                  f"over the imports" + (f", each worker's peak {r['worker_mb']:.0f} MB" if workers else ""))


if __name__ == "__main__":
    main()
