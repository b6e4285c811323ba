"""Shared fixtures: tiny params, a prepared smoke workspace, and subprocess helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import Params, load_raw, validate

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

torch.set_num_threads(1)


def smoke_raw() -> dict:
    return load_raw(REPO / "params.yaml", "smoke")


def smoke_params(**sections) -> Params:
    """The smoke profile with `sections` deep-merged on top (validated)."""
    from pipeline.config import deep_merge

    return validate(deep_merge(smoke_raw(), sections), "test params")


def write_params(root: Path, raw: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tool_env(root: Path) -> dict[str, str]:
    """Environment for running `restorl`/`dvc` as a user would, isolated in `root`."""
    return os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_tool(args: list[str], root: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=tool_env(root), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def prepared_smoke(tmp_path_factory) -> Path:
    """A workspace with the smoke profile's prepared data (shared, read-only for tests)."""
    from pipeline.stages import prepare

    root = tmp_path_factory.mktemp("prepared")
    prepare.run(smoke_params(), root)
    return root


@pytest.fixture
def workspace(tmp_path, prepared_smoke) -> Path:
    """A private copy of the prepared smoke workspace."""
    shutil.copytree(prepared_smoke / "data", tmp_path / "data")
    write_params(tmp_path, smoke_raw())
    return tmp_path


def saved_step(state: Path) -> int:
    """The step of a resume state (0 when there is none yet)."""
    try:
        return torch.load(state, weights_only=True)["step"] if state.exists() else 0
    except Exception:  # caught between the write and the rename of a temp file: not there yet
        return 0


def kill_mid_run(args: list[str], root: Path, state: Path, timeout: float = 300, after_step: int = 0) -> int:
    """Start `args` in `root`, SIGKILL it once it has saved a resume `state` beyond `after_step`;
    the saved step."""
    import signal
    import time

    proc = subprocess.Popen(args, cwd=root, env=tool_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while saved_step(state) <= after_step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-training
    proc.wait()
    step = saved_step(state)
    assert step > after_step, "the run ended before the next checkpoint; the test needs a mid-run kill"
    return step
