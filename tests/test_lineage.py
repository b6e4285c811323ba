"""What the schedules pass (a fresh seed where asked) and the lineage parts on their own. The
flow run that saves its lineage and the fresh clone that restores it from the MLflow tag are in
tests/test_prefect_server.py (one flow run serves the flow's tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import serve
from flows.training import materialise_params, seeded_overrides
from pipeline.config import ConfigError
from pipeline.lineage import TAG, Lineage, LineageError, ref_name, save, tag_mlflow
from tests.conftest import REPO

# ---------------------------------------------------------------------------------------------
# the schedules (fast)


def test_nightly_forces_nothing_and_weekly_draws_a_fresh_seed():
    specs = {s["name"]: s.get("parameters") or {} for s in serve.deployment_specs()}
    nightly, weekly = specs["nightly-rl-finetune"], specs["weekly-full-retrain"]
    # DVC decides what new data invalidated; forcing a stage re-trains identical inputs.
    assert not nightly.get("force") and not weekly.get("force")
    assert not nightly.get("fresh_seed") and weekly["fresh_seed"] == "runtime.seed"
    assert nightly["lineage"] is True and weekly["lineage"] is True


def test_a_fresh_seed_lands_in_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    overrides, seed = seeded_overrides({"sft": {"steps": 3}}, "runtime.seed")
    materialise_params(tmp_path, None, overrides)
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert written["runtime"]["seed"] == seed["runtime.seed"] and written["sft"]["steps"] == 3
    assert seeded_overrides({}, "runtime.seed")[1] != seed  # another run, another seed
    assert seeded_overrides({"sft": {"steps": 3}}, None) == ({"sft": {"steps": 3}}, {})


def test_a_bad_fresh_seed_key_is_one_clear_error():
    with pytest.raises(ConfigError, match="'sft.steps' is not a seed key"):
        seeded_overrides({}, "sft.steps")
    with pytest.raises(ConfigError, match="rl.seed is also set in overrides"):
        seeded_overrides({"rl": {"seed": 4}}, "rl.seed")


def test_saving_without_a_git_remote_names_the_missing_remote(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    with pytest.raises(LineageError, match=f"{tmp_path} has no git remote 'origin'"):
        save(tmp_path, "run-1")
    assert ref_name("nightly-rl-finetune-20261130T020000Z-witty lemur") == \
        "nightly-rl-finetune-20261130T020000Z-witty-lemur"


def test_a_drawn_seed_becomes_a_tag_and_a_param_of_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over the store below
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    stage_run = client.create_run("0")  # the default experiment
    client.log_param(stage_run.info.run_id, "rl.seed", 7)  # the stage read the key itself: left as it is
    (tmp_path / ".restorl/runs").mkdir(parents=True)
    (tmp_path / ".restorl/runs/sft.json").write_text(json.dumps({"run_id": stage_run.info.run_id}))
    kept = Lineage(name="run-1", ref="refs/exps/ab/cd/run-1", commit="0" * 40, git_remote="/srv/restorl.git")
    tagged = tag_mlflow(tmp_path, kept, ["sft", "rl"], {"runtime.seed": 1234, "rl.seed": 7}, uri)
    assert tagged == {"runs": [stage_run.info.run_id], "versions": []}
    data = client.get_run(stage_run.info.run_id).data
    assert data.params["runtime.seed"] == "1234" and data.params["rl.seed"] == "7"
    assert data.tags[TAG + "commit"] == "0" * 40 and data.tags[TAG + "git_remote"] == "/srv/restorl.git"


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
