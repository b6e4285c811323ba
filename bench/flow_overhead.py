"""Overhead of the Prefect flow over `dvc repro` of the same stages, as a ratio (goal <= 1.05).

Two fresh git+DVC workspaces with the same params (default: the smoke profile); one runs
`dvc repro <stages>`, the other the flow against a local `prefect server start` (no push, no
promote), in alternating order. Then both again with everything up to date, which measures
the fixed cost alone. Run: .venv/bin/python bench/flow_overhead.py [--profile smoke|default] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.commands import dvc, git

REPO = Path(__file__).resolve().parent.parent


def workspace(root: Path, profile: str | None) -> Path:
    from flows.training import materialise_params

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    materialise_params(root, profile, {})  # the same params.yaml the flow writes
    return root


def time_dvc(root: Path, stages: list[str]) -> float:
    start = time.perf_counter()
    dvc("repro", *stages, cwd=root)
    return time.perf_counter() - start


def time_flow(root: Path, profile: str | None) -> float:
    from flows.training import training_pipeline

    start = time.perf_counter()
    state = training_pipeline(profile=profile, workspace=str(root), push=False, promote=False, return_state=True)
    seconds = time.perf_counter() - start
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state.message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="smoke", help="a pipeline/profiles/ name, or 'default' for params.yaml as is")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.profile == "default":
        args.profile = None

    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_LEVEL,
        temporary_settings,
    )

    from flows.local_server import local_server
    from flows.training import PROMOTE, stage_order

    stages = [s for s in stage_order(REPO / "dvc.yaml") if s != PROMOTE]
    tmp = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    rows = []
    with local_server(tmp / "prefect") as url, \
            temporary_settings(updates={PREFECT_API_URL: url, PREFECT_LOGGING_LEVEL: "WARNING"}):
        for i in range(args.repeats):
            a, b = workspace(tmp / f"dvc{i}", args.profile), workspace(tmp / f"flow{i}", args.profile)
            # Alternate the order so that a busy neighbour does not favour one side.
            if i % 2:
                flow_cold, dvc_cold = time_flow(b, args.profile), time_dvc(a, stages)
            else:
                dvc_cold, flow_cold = time_dvc(a, stages), time_flow(b, args.profile)
            dvc_warm, flow_warm = time_dvc(a, stages), time_flow(b, args.profile)
            rows.append((dvc_cold, flow_cold, dvc_warm, flow_warm))
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"stages: {' -> '.join(stages)}; profile {args.profile}; {args.repeats} repeat(s); "
          f"{os.cpu_count()} CPUs")
    print(f"{'':4} {'dvc repro s':>12} {'flow s':>8} {'ratio':>6} | {'up-to-date: dvc s':>18} {'flow s':>8} {'extra s':>8}")
    for i, (dc, fc, dw, fw) in enumerate(rows):
        print(f"{i:<4} {dc:12.1f} {fc:8.1f} {fc / dc:6.3f} | {dw:18.1f} {fw:8.1f} {fw - dw:8.1f}")
    dc, fc = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"overall ratio flow / dvc repro: {fc / dc:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
