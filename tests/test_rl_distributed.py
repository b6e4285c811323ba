"""`rl` on two processes (real torch.distributed, gloo, on the CPU, under torchrun).

`rl.images_per_epoch` and `rl.minibatch` are global: two ranks sampling the groups of 2 images
each must end where one process with 4 images ends (float rounding apart), for the default
objective (refl, with the SFT term of the adaptive weighting) and for PPO with the parts that
read the other ranks' rollouts (batch-wide advantage std, CoCA credit, KL, regularizers); a
killed two-process run must resume and end where an uninterrupted one does; only rank 0 writes
outputs and talks to MLflow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.paths import Paths
from tests.conftest import (
    BIN,
    kill_launcher_mid_run,
    run_tool,
    scored_stand_ins,
    smoke_params,
    smoke_raw,
    write_params,
)

EPOCHS = 3
STATE = "checkpoints/resume/rl/state.pt"
# Global: 4 images of 2 rollouts, minibatches of 4 rollouts (2 per rank), 2 per epoch.
RL = {"epochs": EPOCHS, "images_per_epoch": 4, "minibatch": 4, "difficulty": {"oversample": 0.5}}
# PPO and the parts that see the whole batch: the advantages' std over all groups, CoCA's
# credit from the gathered trajectories, the KL and both regularizers; 2 inner epochs.
PPO = {"objective": "ppo", "step_credit": "coca", "advantage_std": "global", "kl_beta": 1.0,
       "regularizers": ["gram", "gt_likelihood"], "inner_epochs": 2}
# Float rounding only (other batch shapes and summation orders): two processes differ from one
# by ~1.5e-6 (refl, 6 steps) and ~7e-6 (ppo, 24 steps), in parameters whose gradient is mostly
# rounding noise, which Adam steps by up to lr = 1.5e-5 either way. A rank sampling images
# that are not its own, rollout or SFT noise drawn per rank, gradients not averaged (all
# ~1.4e-4), difficulties or advantage statistics of one rank's groups only (3e-5, 4.7e-5) move
# them further; the last two also change the logged curves, which are compared below.
TOLERANCE = 2e-5
LOSSES = {"loss_rl", "loss_sft", "kl", "clip_frac", "loss_reg", "kl_pull"}
# Val PSNRs are written to 4 decimals: weights equal to float rounding (~1e-5) can move one by a
# unit in that last digit (seen: a worst-task drop of -0.0057 against -0.0058).
WRITTEN_TO_4_DECIMALS = {"val_psnr", "val_psnr_drop", "val_psnr_drop_worst_task"}


def torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n), "-m", "pipeline.cli", "rl"]


@pytest.fixture(scope="module")
def rl_ready(tmp_path_factory, prepared_smoke) -> Path:
    """Prepared smoke data, an SFT stand-in, a reward model and the difficulty table."""
    return scored_stand_ins(tmp_path_factory.mktemp("rl-ready"), prepared_smoke)


def _workspace(tmp_path_factory, rl_ready: Path, name: str, **rl) -> Path:
    root = tmp_path_factory.mktemp(name)
    for part in ("data", "checkpoints"):
        shutil.copytree(rl_ready / part, root / part)
    raw = smoke_raw()
    raw["runtime"]["threads"] = 1  # two processes on two cores: one thread each
    for key, value in (RL | rl).items():
        raw["rl"][key] = raw["rl"].get(key, {}) | value if isinstance(value, dict) else value
    write_params(root, raw)
    return root


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "checkpoints/rl/unet/diffusion_pytorch_model.safetensors")


def _largest_difference(one: Path, two: Path) -> float:
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, rl_ready) -> tuple[Path, str]:
    """An uninterrupted two-process run (refl): its workspace and stdout."""
    root = _workspace(tmp_path_factory, rl_ready, "rl-two")
    return root, run_tool(torchrun(2), root).stdout


def _assert_same_training(one: Path, two: Path) -> None:
    worst = _largest_difference(one, two)
    print(f"largest weight difference between one and two processes: {worst:.3g}")
    assert worst < TOLERANCE, f"two processes drifted from one by {worst}"
    # Every epoch's figures are the global batch's: rewards, difficulties, weights, val (the
    # the same selected epoch); the update's losses (means of small, cancelling terms) to rounding.
    rows = [(root / "plots/rl_curves.csv").read_text().splitlines() for root in (one, two)]
    assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1]) == 1 + EPOCHS
    for x, y in zip(rows[0][1:], rows[1][1:]):
        for name, u, v in zip(rows[0][0].split(","), x.split(","), y.split(",")):
            loose = name in LOSSES
            digit = 1.01e-4 if name in WRITTEN_TO_4_DECIMALS else 1e-6
            assert float(u) == pytest.approx(float(v), rel=1e-2 if loose else 1e-5, abs=1e-3 if loose else digit), name
    summaries = [json.loads((root / "metrics/rl.json").read_text()) for root in (one, two)]
    assert summaries[0]["best_epoch"] == summaries[1]["best_epoch"]
    # rl.json's val figures are differences of val figures (the SFT and the best epoch's): twice the tolerance
    assert summaries[0]["val_reward_gain"] == pytest.approx(summaries[1]["val_reward_gain"], abs=2e-5)
    for key in ("val_psnr_drop", "val_psnr_drop_worst_task"):
        assert summaries[0][key] == pytest.approx(summaries[1][key], abs=2.02e-4), key


@pytest.mark.e2e
def test_two_processes_end_with_the_weights_of_one_process_on_all_images(two_processes, tmp_path_factory,
                                                                        rl_ready):
    one = _workspace(tmp_path_factory, rl_ready, "rl-one")
    run_tool([str(BIN / "restorl"), "rl"], one)
    _assert_same_training(one, two_processes[0])


@pytest.mark.e2e
def test_two_processes_match_one_with_ppo_and_batch_wide_parts(tmp_path_factory, rl_ready):
    one, two = (_workspace(tmp_path_factory, rl_ready, f"rl-ppo-{n}", **PPO) for n in (1, 2))
    run_tool([str(BIN / "restorl"), "rl"], one)
    run_tool(torchrun(2), two)
    _assert_same_training(one, two)


def _kill_all_mid_run(args: list[str], root: Path) -> int:
    epoch = kill_launcher_mid_run(args, root, root / STATE)
    assert 0 < epoch < EPOCHS, "the run ended before its first checkpoint; the test needs a mid-run kill"
    return epoch


@pytest.mark.e2e
def test_a_killed_two_process_run_resumes_and_ends_where_an_uninterrupted_one_does(two_processes, tmp_path_factory,
                                                                                   rl_ready):
    root = _workspace(tmp_path_factory, rl_ready, "rl-killed")
    epoch = _kill_all_mid_run(torchrun(2), root)
    assert not (root / "checkpoints/rl").exists(), "a killed run must not leave a final model"

    resumed = run_tool(torchrun(2), root)
    assert resumed.stdout.count(f"resuming from epoch {epoch}") == 1  # printed by rank 0 only
    assert not (root / STATE).exists(), "a finished run clears its resume state"
    a, b = _weights(two_processes[0]), _weights(root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (root / "plots/rl_curves.csv").read_text() == (two_processes[0] / "plots/rl_curves.csv").read_text()


def test_only_the_main_process_writes_and_logs(two_processes):
    root, stdout = two_processes
    assert stdout.count(f"rl: {EPOCHS} epochs (") == 1
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["restorl"], output_format="list")
    assert [r.data.tags["restorl.stage"] for r in runs] == ["rl"]
    versions = mlflow.MlflowClient().search_model_versions("name='restorer'")
    assert [int(v.version) for v in versions] == [1]
    assert json.loads((root / "metrics/rl.json").read_text())["registered"]["run_id"] == runs[0].info.run_id


@pytest.mark.parametrize("key, value", [("images_per_epoch", 3), ("minibatch", 3)])
def test_images_or_minibatches_that_do_not_split_over_the_processes_are_an_error(rl_ready, monkeypatch, key, value):
    """Checked before any process group starts (here as rank 0 of 2, without a launcher)."""
    from pipeline.stages import rl

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=rf"rl\.{key} is {value}, .* multiple of the number of processes \(2\)"):
        rl.run(smoke_params(rl={key: value}), rl_ready)
    assert not Paths(rl_ready).rl_model.exists()
