"""SFT throughput (images/s) and peak memory on 1 and on N processes of this machine.

    python bench/sft_processes.py [--params params.yaml] [--profile NAME] [--steps 60]
                                  [--processes 1 2] [--threads-total 2]

Prepares the profile's data once in a temp workspace, then runs `restorl sft` for `--steps`
steps per process count (N > 1 through $RESTORL_PROCESSES, i.e. torchrun), each process with
threads-total / N torch threads so every run uses the same cores. Throughput is the global
batch times the steps over the training time the stage logs to MLflow (`train_seconds`, no
start-up); peak memory is the largest summed RSS of the process tree, polled every 50 ms.
Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from pipeline.config import load_raw

BIN = Path(sys.executable).parent


def tree_rss(proc: psutil.Process) -> int:
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(args: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Run, polling the tree's RSS; the peak in bytes (raises on failure)."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(handle))
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.read()[-2000:]}")
    return peak


def train_seconds(workspace: Path) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("restorl")
    runs = client.search_runs([experiment.experiment_id], "tags.`restorl.stage` = 'sft'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.metrics["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads-total", type=int, default=2)
    args = ap.parse_args()
    raw = load_raw(Path(args.params), args.profile)
    batch = raw["sft"]["batch_size"]
    with tempfile.TemporaryDirectory(prefix="restorl-bench-") as tmp:
        root = Path(tmp)
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        env.pop("RESTORL_PROCESSES", None)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        subprocess.run([str(BIN / "restorl"), "prepare"], cwd=root, env=env, check=True, capture_output=True)
        print(f"sft: {args.steps} steps, global batch {batch}, {raw['prepare']['patch_size']} px, "
              f"{args.threads_total} threads in all")
        for n in args.processes:
            run_raw = raw | {"runtime": raw["runtime"] | {"threads": max(1, args.threads_total // n)},
                             "sft": raw["sft"] | {"steps": args.steps, "checkpoint_every": args.steps}}
            (root / "params.yaml").write_text(yaml.safe_dump(run_raw, sort_keys=False))
            peak = run([str(BIN / "restorl"), "sft"], root, env | {"RESTORL_PROCESSES": str(n)})
            seconds = train_seconds(root)
            print(f"{n} process{'es' if n > 1 else '  '}  {args.steps * batch / seconds:8.1f} images/s   "
                  f"peak RSS {peak / 2**20:7.0f} MB (all processes)")


if __name__ == "__main__":
    main()
