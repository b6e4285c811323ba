"""`sft` on two processes (real torch.distributed, gloo, on the CPU), through both launchers
docs/distributed.md names: `accelerate launch` and `torchrun`.

`sft.batch_size` is the global batch: two ranks of 4 rows each must end where one process with
a batch of 8 ends (float rounding apart), a killed two-process run must resume and end where an
uninterrupted one does, and only rank 0 may write outputs and talk to MLflow.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, kill_launcher_mid_run, run_tool, smoke_raw, tool_env, write_params

pytestmark = pytest.mark.e2e  # every test here starts real launchers

STEPS, BATCH = 16, 8  # BATCH: global; 4 rows per rank
# Float rounding only: after these 16 steps two processes differ from one by ~9e-6 at most, as
# much as one process with 2 threads differs from one with 1 thread (~1e-5; other summation
# orders, amplified by Adam). A real difference in draws or gradients (a rank drawing its own
# batch, gradients not averaged) moves weights by ~lr = 1e-3 per step.
TOLERANCE = 3e-5
STATE = "checkpoints/resume/sft/state.pt"


def _params(root: Path) -> None:
    raw = smoke_raw()
    raw["runtime"]["threads"] = 1  # two processes on two cores: one thread each
    raw["sft"] |= {"steps": STEPS, "batch_size": BATCH, "checkpoint_every": 4}
    write_params(root, raw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n: int) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", "pipeline.cli", "sft"]


def torchrun(n: int) -> list[str]:
    # --standalone: a free rendezvous port (other test runs may share the machine)
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n), "-m", "pipeline.cli", "sft"]


def _workspace(tmp_path_factory, prepared_smoke: Path, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(prepared_smoke / "data", root / "data")
    _params(root)
    return root


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "checkpoints/sft/unet/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, prepared_smoke) -> tuple[Path, str]:
    """An uninterrupted two-process run under `accelerate launch`: its workspace and stdout."""
    root = _workspace(tmp_path_factory, prepared_smoke, "two-processes")
    return root, run_tool(accelerate_launch(2), root).stdout


def test_two_processes_end_with_the_weights_of_one_process_on_the_whole_batch(two_processes, tmp_path_factory,
                                                                           prepared_smoke):
    one = _workspace(tmp_path_factory, prepared_smoke, "one-process")
    run_tool([str(BIN / "restorl"), "sft"], one)
    a, b = _weights(one), _weights(two_processes[0])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest difference between one and two processes: {worst:.3g}")
    assert worst < TOLERANCE, f"two processes drifted from one by {worst}"
    # The loss curve is the global batch's: the same to the CSV's 6 digits, up to float rounding.
    one_curve = (one / "plots/sft_loss.csv").read_text().splitlines()[1:]
    two_curve = (two_processes[0] / "plots/sft_loss.csv").read_text().splitlines()[1:]
    assert len(one_curve) == len(two_curve)
    for x, y in zip(one_curve, two_curve):
        assert abs(float(x.split(",")[1]) - float(y.split(",")[1])) < 1e-6 * max(1.0, float(x.split(",")[1]))


def _kill_all_mid_run(args: list[str], root: Path) -> int:
    step = kill_launcher_mid_run(args, root, root / STATE)
    assert 0 < step < STEPS, "the run ended before its first checkpoint; the test needs a mid-run kill"
    return step


def test_a_killed_two_process_run_resumes_and_ends_where_an_uninterrupted_one_does(two_processes, tmp_path_factory,
                                                                                   prepared_smoke):
    root = _workspace(tmp_path_factory, prepared_smoke, "killed")
    step = _kill_all_mid_run(torchrun(2), root)
    assert not (root / "checkpoints/sft").exists(), "a killed run must not leave a final model"

    resumed = run_tool(torchrun(2), root)
    assert resumed.stdout.count(f"resuming from step {step}") == 1  # printed by rank 0 only
    assert not (root / STATE).exists(), "a finished run clears its resume state"
    a, b = _weights(two_processes[0]), _weights(root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (root / "plots/sft_loss.csv").read_text() == (two_processes[0] / "plots/sft_loss.csv").read_text()


def test_only_the_main_process_writes_and_logs(two_processes):
    root, stdout = two_processes
    assert stdout.count(f"sft: {STEPS} steps in") == 1
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["restorl"], output_format="list")
    assert [r.data.tags["restorl.stage"] for r in runs] == ["sft"]
    versions = mlflow.MlflowClient().search_model_versions("name='restorer'")
    assert [int(v.version) for v in versions] == [1]
    info = json.loads((root / ".restorl/runs/sft.json").read_text())
    assert info["run_id"] == runs[0].info.run_id


def test_a_global_batch_that_does_not_split_over_the_processes_is_an_error(tmp_path_factory, prepared_smoke):
    """Checked before any process group starts: as rank 0 of 3, without a launcher."""
    root = _workspace(tmp_path_factory, prepared_smoke, "uneven")
    env = tool_env(root) | {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([str(BIN / "restorl"), "sft"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft.batch_size is 8" in proc.stderr and "multiple of the number of processes (3)" in proc.stderr
    assert not (root / "checkpoints").exists()


def test_a_stage_that_runs_as_one_process_refuses_a_launcher(workspace):
    """score under a launcher would run N times over, each rank writing and logging: refused."""
    env = tool_env(workspace) | {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    proc = subprocess.run([str(BIN / "restorl"), "score"], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "score runs as one process" in proc.stderr and "WORLD_SIZE is 2" in proc.stderr


def test_restorl_processes_starts_one_process_per_slot_under_torchrun(two_processes, tmp_path_factory,
                                                                    prepared_smoke, monkeypatch):
    """$RESTORL_PROCESSES=2 (the GPU image sets `gpus`: one per GPU) turns plain `restorl sft`,
    as dvc.yaml calls it, into the two-process run: the same weights as the launcher's."""
    root = _workspace(tmp_path_factory, prepared_smoke, "restorl-processes")
    monkeypatch.setenv("RESTORL_PROCESSES", "2")
    out = run_tool([str(BIN / "restorl"), "sft"], root).stdout
    assert "RESTORL_PROCESSES=2: starting 2 processes" in out and out.count("sft: 16 steps") == 1
    a, b = _weights(root), _weights(two_processes[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_restorl_processes_is_named(workspace, monkeypatch):
    monkeypatch.setenv("RESTORL_PROCESSES", "two")
    proc = run_tool([str(BIN / "restorl"), "sft"], workspace, check=False)
    assert proc.returncode == 2 and "$RESTORL_PROCESSES is 'two'" in proc.stderr
    assert not (workspace / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# evaluate: the restorations shared among the processes


def test_evaluate_on_two_processes_writes_what_one_process_writes(tmp_path_factory, prepared_smoke):
    """Each restoration (model x sampler setting) seeds its own generator, so sharing them among
    processes changes nothing: the same metrics and frontier, byte for byte; only rank 0 writes."""
    from tests.conftest import scored_stand_ins

    roots = []
    for name in ("evaluate-one", "evaluate-two"):
        root = scored_stand_ins(tmp_path_factory.mktemp(name), prepared_smoke)
        shutil.copytree(root / "checkpoints/sft", root / "checkpoints/rl")
        _params(root)
        roots.append(root)
    run_tool([str(BIN / "restorl"), "evaluate"], roots[0])
    two = run_tool([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli", "evaluate"],
                   roots[1]).stdout
    assert two.count("Against SFT on the same patches") == 1, "the main process alone prints the table"
    for output in ("metrics/evaluate.json", "metrics/evaluate_detail.json", "plots/frontier.csv"):
        assert (roots[0] / output).read_bytes() == (roots[1] / output).read_bytes(), output
    mlflow.set_tracking_uri(f"sqlite:///{roots[1] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["restorl"], output_format="list")
    assert sorted(r.data.tags["restorl.stage"] for r in runs) == ["evaluate", "score"]


# ---------------------------------------------------------------------------------------------
# reward: the SFT restorations shared, the global batch's rows scored by their own process

# Adam turns rounding in near-zero gradient components into whole steps, so the reward model's
# weights are compared by relative norm after a few steps: after 4, two processes differ from one
# by 4.6e-4 (one process on 2 threads against 1 thread: 1.0e-4); gradients left unaveraged give
# 1.7e-2. Longer runs blur the two (after 12: 9.7e-3 against 4.1e-2).
REWARD_STEPS, REWARD_TOLERANCE = 4, 2e-3


def test_reward_on_two_processes_ends_with_the_weights_of_one_process_on_the_whole_batch(tmp_path_factory,
                                                                                          prepared_smoke):
    """Each restoration batch seeds its own generator and every process scores its rows of the
    global batch: two processes of 4 rows end with the weights and checks of one process of 8
    (float rounding apart); only rank 0 writes and logs."""
    from tests.conftest import scored_stand_ins

    roots = []
    for name in ("reward-one", "reward-two"):
        root = scored_stand_ins(tmp_path_factory.mktemp(name), prepared_smoke)
        shutil.rmtree(root / "checkpoints/reward")
        raw = smoke_raw()
        raw["runtime"]["threads"] = 1
        raw["reward"] |= {"steps": REWARD_STEPS, "batch_size": 8}
        raw["evaluate"]["batch_size"] = 2  # several restoration batches for the processes to share
        write_params(root, raw)
        roots.append(root)
    run_tool([str(BIN / "restorl"), "reward"], roots[0])
    two = run_tool([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli", "reward"],
                   roots[1]).stdout
    assert two.count('"gt_above_lq"') == 1, "the main process alone prints the checks"
    one_w, two_w = (load_file(root / "checkpoints/reward/model.safetensors") for root in roots)
    diff, ref = (torch.cat([w[k].flatten() for k in one_w]) for w in ({k: one_w[k] - two_w[k] for k in one_w}, one_w))
    assert float(diff.norm() / ref.norm()) < REWARD_TOLERANCE
    one_c, two_c = (json.loads((root / "checkpoints/reward/checks.json").read_text()) for root in roots)
    # The reward's SFT training pairs are single samples (reward.sft_sampling), whose noise makes the
    # two runs' float rounding grow: weights 6.7e-4 apart (1.8e-4 with 8-sample pairs), the val SFT
    # outputs' mean score 0.004 apart (measured on the smoke profile).
    assert two_c["mean"]["sft"] == pytest.approx(one_c["mean"]["sft"], abs=1e-2)
    losses = []
    for root in roots:
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=["restorl"], output_format="list")
        assert sorted(r.data.tags["restorl.stage"] for r in runs) == ["reward", "score"]
        logged = next(r for r in runs if r.data.tags["restorl.stage"] == "reward").data.metrics
        losses.append((logged["bt_loss"], logged["hack_loss"]))  # the last step's, of the global batch
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
