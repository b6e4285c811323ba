"""The CLI turns user errors into one clear message and exit code 2, with no partial output."""

import pytest

from tests.conftest import BIN, run_tool, smoke_raw, write_params


def test_bad_param_fails_before_any_work(tmp_path):
    raw = smoke_raw()
    raw["prepare"]["patch_size"] = 30
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "prepare"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "prepare.patch_size: must be a multiple of 8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_sft_without_prepared_data_names_the_missing_manifest(tmp_path):
    write_params(tmp_path, smoke_raw())
    proc = run_tool([str(BIN / "restorl"), "sft"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "data/prepared/manifest.json: not found; run the prepare stage first" in proc.stderr
    assert not (tmp_path / "checkpoints" / "sft").exists()


def test_params_command_prints_merged_profile(tmp_path):
    from tests.conftest import REPO

    proc = run_tool([str(BIN / "restorl"), "params", "--params", str(REPO / "params.yaml"), "--profile", "smoke"], tmp_path)
    assert "block_out_channels:\n  - 8" in proc.stdout


def test_unknown_part_names_fail_before_any_work(tmp_path):
    """Part names are checked against the parts (not the schema), still before any work:
    prepare with a degradation that does not exist, rl with a step credit that does not (named
    with the file, before the workspace's MLflow store is created)."""
    raw = smoke_raw()
    raw["prepare"]["degradations"]["tasks"]["fog"] = {"weight": 1}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "prepare"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "params.yaml: invalid params: prepare.degradations.tasks.fog: unknown degradation 'fog'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()
    assert not (tmp_path / "mlflow.db").exists()
    # `restorl params` checks every name up front, as repro and the flow do.
    proc = run_tool([str(BIN / "restorl"), "params"], tmp_path, check=False)
    assert proc.returncode == 2 and "tasks.fog: unknown degradation" in proc.stderr

    raw = smoke_raw()
    raw["rl"]["step_credit"] = "gae"
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "rl"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "params.yaml: invalid params: rl.step_credit: unknown 'gae'; known: ['coca', 'next_checkpoint', " \
           "'terminal']" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()
    # Checked before the tracking store is created (and before the stage's imports).
    assert not (tmp_path / "mlflow.db").exists()


def test_diverging_sft_stops_at_the_first_non_finite_loss(tmp_path, prepared_smoke):
    """A learning rate far too high: exit 2 naming the stage, the step and the last good resume
    state; no model saved, none registered."""
    import shutil

    from mlflow.tracking import MlflowClient

    shutil.copytree(prepared_smoke / "data", tmp_path / "data")
    raw = smoke_raw()
    raw["sft"] |= {"lr": 1e30, "steps": 40, "checkpoint_every": 2}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "sft"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft: the loss is" in proc.stderr and "nothing was saved or registered" in proc.stderr
    assert "the last good state is checkpoints/resume/sft/state.pt (step" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints/sft").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_model_versions("name='restorer'") == []


@pytest.mark.parametrize("change, message", [
    ({"model": {"block_out_channels": [12, 16, 16]}}, "model: block_out_channels [12]: every block needs a positive channel count divisible by norm_groups (8)"),
    ({"storage": {"endpoint_url": "127.0.0.1:9000"}}, "storage.endpoint_url: '127.0.0.1:9000' needs its scheme"),
    ({"runtime": {"device": "cuda"}}, "runtime.device is 'cuda' but torch sees no CUDA device"),
    ("deleted experiment", "MLflow experiment 'restorl' (tracking.experiment) is deleted in sqlite:///"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, change, message):
    from pipeline.config import deep_merge

    if change == "deleted experiment":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        client.delete_experiment(client.create_experiment("restorl"))
        change = {}
    if change.get("runtime", {}).get("device") == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    write_params(tmp_path, deep_merge(smoke_raw(), change))
    proc = run_tool([str(BIN / "restorl"), "sft"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()



# Runs `restorl <stage>` in this interpreter and reports what it had imported when it stopped.
IMPORTED_AT_EXIT = """
import sys
from pipeline.cli import main
sys.argv = ["restorl", sys.argv[1]]
try:
    main()
except SystemExit as stop:
    heavy = sorted(m for m in ("diffusers", "pyiqa", "pipeline.stages." + sys.argv[1]) if m in sys.modules)
    print("exit", stop.code, "imported", heavy or "none")
"""


@pytest.mark.parametrize("stage, bad, message", [
    ("sft", {"model": {"block_out_channels": [12, 16, 16]}}, "model: block_out_channels [12]"),
    ("promote", "deleted experiment", "MLflow experiment 'restorl' (tracking.experiment) is deleted"),
    ("repro", {"model": {"block_out_channels": [12, 16, 16]}}, "model: block_out_channels [12]"),
    ("rl", {"runtime": {"device": "cuda"}}, "runtime.device is 'cuda' but torch sees no CUDA device"),
])
def test_bad_settings_are_reported_before_the_stage_is_imported(tmp_path, stage, bad, message):
    """A stage command checks its params and the tracking server before it imports the stage
    module (torch, diffusers and the stage's parts: seconds of start-up), so a typo or a dead
    server is reported at once; `restorl repro` checks every stage's params without importing any."""
    from pipeline.config import deep_merge

    if bad == "deleted experiment":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        client.delete_experiment(client.create_experiment("restorl"))
        bad = {}
    if bad.get("runtime", {}).get("device") == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    write_params(tmp_path, deep_merge(smoke_raw(), bad))
    proc = run_tool([str(BIN / "python"), "-c", IMPORTED_AT_EXIT, stage], tmp_path, check=False)
    assert proc.stdout.split() == ["exit", "2", "imported", "none"], proc.stdout + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
