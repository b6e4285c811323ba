"""`evaluate`'s streamed scoring on a test split 1x and `--scale` times the profile's: patches/s
and how far peak memory rises, to show that memory does not grow with the split.

    python bench/evaluate_streaming.py [--params params.yaml] [--profile NAME] [--scale 10]

Prepares each test split once in a temp folder (prepare.patches_per_image.test x 1 and x scale),
saves a restorer of the profile's architecture (random weights: the cost of sampling does not
depend on them) and scores the split in its own process as `evaluate` does (`score_split`: the
DataLoader, every batch restored at `evaluate.sampling` and scored by PSNR, SSIM and the realism
statistics). The peak RSS includes heap pages glibc keeps for reuse after they are freed; what
the process still holds at the end (after malloc_trim) and the size of the per-patch figures it
keeps are printed beside it. Prints figures only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

from pipeline.config import load_raw, validate


def child(workspace: str, params_file: str) -> None:
    from pipeline.config import load_params
    from pipeline.data.dataset import PatchPairs
    from pipeline.models.loading import load_restorer
    from pipeline.paths import Paths
    from pipeline.scoring import Judges, score_split

    params = load_params(Path(params_file), None)
    torch.set_num_threads(params.runtime.threads)
    paths = Paths(Path(workspace))
    test = PatchPairs(paths.data, "test")
    model = load_restorer(paths.sft_model)
    process = psutil.Process()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after the imports and the model
    live_before = _trimmed_rss_mb(process)
    t0 = time.perf_counter()
    scored = score_split(test, {"sft": model}, [params.evaluate.sampling], Judges(["psnr", "ssim"], []), params,
                         controls=True)
    seconds = time.perf_counter() - t0
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps({"patches": len(test), "seconds": seconds, "grew_mb": grew,
                      "held_mb": _trimmed_rss_mb(process) - live_before, "kept_kb": _kept_bytes(scored) / 1024}))


def _trimmed_rss_mb(process) -> float:
    """Resident memory after glibc returns freed heap pages to the system (malloc_trim; elsewhere
    the plain RSS): what the process still holds, not what its allocator keeps for reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return process.memory_info().rss / 2 ** 20


def _kept_bytes(scored) -> int:
    def tensors(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        else:
            yield x
    return sum(t.untyped_storage().nbytes() for part in (scored.per_image, scored.statistics, scored.points)
               for t in tensors(part))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from pipeline.models.restorer import PixelRestorer

    base = load_raw(Path(args.params), args.profile)
    for scale in (1, args.scale):
        raw = json.loads(json.dumps(base))
        raw["prepare"]["patches_per_image"]["test"] *= scale
        params = validate(raw, args.params)
        with tempfile.TemporaryDirectory(prefix="restorl-bench-") as tmp:
            (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
            subprocess.run([str(Path(sys.executable).parent / "restorl"), "prepare"], cwd=tmp, env=env, check=True,
                           capture_output=True)
            tasks = list(params.prepare.degradations.tasks)
            PixelRestorer.build(params.model, tasks).save_pretrained(Path(tmp) / "checkpoints" / "sft")
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(Path(tmp) / "params.yaml")],
                                 capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"test split x{scale:<3} {r['patches']:6d} patches  {r['patches'] / r['seconds']:7.1f} patches/s   "
                  f"peak RSS +{r['grew_mb']:5.0f} MB over the imports and the model; held at the end "
                  f"+{r['held_mb']:4.0f} MB, of which the per-patch figures {r['kept_kb']:.0f} kB")


if __name__ == "__main__":
    main()
