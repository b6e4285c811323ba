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


def kill_mid_run(args: list[str], root: Path, state, timeout: float = 300, after_step: int = 0) -> int:
    """Start `args` in `root`, SIGKILL it once it has saved a resume `state` beyond `after_step`;
    the saved step. `state`: the state file, or a function giving the saved step (0: none)."""
    import signal
    import time

    step_of = state if callable(state) else lambda: saved_step(state)
    proc = subprocess.Popen(args, cwd=root, env=tool_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while step_of() <= after_step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-training
    proc.wait()
    step = step_of()
    assert step > after_step, "the run ended before the next checkpoint; the test needs a mid-run kill"
    return step


def kill_launcher_mid_run(args: list[str], root: Path, state: Path, timeout: float = 300) -> int:
    """Start a launcher (torchrun), SIGKILL it and its workers together (a pre-empted node) once
    a resume `state` is saved; the saved step. Killing the launcher alone leaves its workers running."""
    import time

    import psutil

    proc = subprocess.Popen(args, cwd=root, env=tool_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(proc.pid)
    deadline = time.time() + timeout
    while saved_step(state) == 0 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    family = [launcher, *launcher.children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)
    return saved_step(state)


def stand_in_judge(root: Path) -> Path:
    """A small untrained reward model as the held-out judge in `root` (what rl.judge_guard reads),
    drawn from its own seed: the global torch generator is left as it was."""
    from pipeline.models.reward_model import RewardModel
    from pipeline.paths import Paths

    with torch.random.fork_rng():
        torch.manual_seed(1)
        RewardModel(kernels=8, hidden=16).save(Paths(root).judge_model)
    return Paths(root).judge_model


def scored_stand_ins(root: Path, prepared: Path) -> Path:
    """In `root`: the prepared smoke data, an SFT stand-in (a barely trained-looking restorer),
    a small reward model and the score table: what `rl` needs, made in seconds."""
    from pipeline.data.dataset import load_split
    from pipeline.models.restorer import PixelRestorer
    from pipeline.models.reward_model import RewardModel
    from pipeline.paths import Paths
    from pipeline.stages import score

    shutil.copytree(prepared / "data", root / "data")
    paths = Paths(root)
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, load_split(paths.data, "train").tasks)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.02)
    model.save_pretrained(paths.sft_model)
    RewardModel(kernels=8, hidden=16).save(paths.reward_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        score.run(smoke_params(), root)
    stand_in_judge(root)
    return root


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end tests first, each file's tests in their own order: `make test`
    hands whole files to two workers (pytest-xdist --dist loadfile), and the long files started
    first leave the short ones to fill the gaps, rather than one long file running alone at the end."""
    heavy = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in heavy)
