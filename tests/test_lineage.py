"""Scheduled runs keep their lineage: a flow run is saved as a DVC experiment on the git remote,
its checkpoints on the DVC remote (moto S3), the MLflow runs and versions name it, and a fresh
clone restores the promoted checkpoint from that name alone. Plus what the schedules pass."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import serve
from flows.local_server import local_server
from flows.training import materialise_params, seeded_overrides, training_pipeline
from pipeline.config import ConfigError
from pipeline.lineage import TAG, Lineage, LineageError, ref_name, save, tag_mlflow
from tests.conftest import BIN, REPO
from tests.test_storage import moto_fixture, s3  # noqa: F401  (registers the `moto` fixture here)

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


# ---------------------------------------------------------------------------------------------
# a flow run on the smoke profile, then a fresh clone


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def new_workspace(root: Path, bare: Path, endpoint: str) -> None:
    """A committed git+DVC workspace of this repo's pipeline with a git remote `origin` (a bare
    repository) and an S3 DVC remote, as a deployment's clone has."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], root)
    run([BIN / "dvc", "init", "-q"], root)
    run([BIN / "restorl", "remote", "s3://lineage/store", "--endpoint", endpoint], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    run(["git", "init", "-q", "--bare", bare], root)
    run(["git", "remote", "add", "origin", bare], root)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], root)


def drain_prefect_queues() -> None:
    """Send the queued flow logs and events while the server still runs: sent after it stopped,
    they hold the test process's exit in retries."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="module")
def lineage_run(moto, tmp_path_factory):
    """One flow run (smoke profile, fresh rl seed, promote, lineage) against a local Prefect
    server, moto S3 and a bare git remote."""
    endpoint, key_id, secret = moto
    s3(moto).create_bucket(Bucket="lineage")
    base = tmp_path_factory.mktemp("lineage")
    root, bare = base / "ws", base / "remote.git"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                            "AWS_DEFAULT_REGION": "us-east-1", "DVC_NO_ANALYTICS": "1",
                            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}.items():
            env.setenv(name, value)
        new_workspace(root, bare, endpoint)
        # The server and the variables stay while the module's tests run (the clone pulls from S3).
        with local_server(base / "prefect") as url:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                state = training_pipeline(profile="smoke", workspace=str(root), promote=True, lineage=True,
                                          fresh_seed="rl.seed", retries=0, return_state=True)
            yield {"root": root, "bare": bare, "state": state, "endpoint": endpoint, "url": url}
            drain_prefect_queues()


@pytest.mark.e2e
def test_a_fresh_clone_restores_the_promoted_checkpoint_from_the_mlflow_tag(lineage_run, tmp_path):
    root, state = lineage_run["root"], lineage_run["state"]
    assert state.is_completed(), state.message
    saved = state.result()[-1]
    assert saved["stage"] == "lineage" and saved["pushed"], saved

    # The promoted version is the one the rl stage registered; it and its run carry the reference.
    registered = json.loads((root / "metrics/rl.json").read_text())["registered"]
    promote = json.loads((root / "metrics/promote.json").read_text())
    assert promote["outcome"] == "promoted" and promote["challenger"] == registered["version"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    tags = client.get_model_version(registered["model"], registered["version"]).tags
    run_tags = client.get_run(registered["run_id"]).data.tags
    for key in ("name", "ref", "commit", "git_remote"):
        assert tags[TAG + key] == run_tags[TAG + key] == saved[TAG + key], key
    assert tags[TAG + "git_remote"] == str(lineage_run["bare"])
    seed = int(tags["restorl.fresh_seed"].removeprefix("rl.seed="))
    assert run_tags["restorl.fresh_seed"] == tags["restorl.fresh_seed"]
    assert client.get_run(registered["run_id"]).data.params["rl.seed"] == str(seed)

    # Nothing but the tag: clone the git remote, pull the experiment, apply it.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", lineage_run["bare"], clone], tmp_path)
    run([BIN / "dvc", "remote", "modify", "--local", "store", "endpointurl", lineage_run["endpoint"]], clone)
    run([BIN / "dvc", "exp", "pull", "origin", tags[TAG + "name"]], clone)
    run([BIN / "dvc", "exp", "apply", tags[TAG + "name"]], clone)
    assert run(["git", "rev-parse", tags[TAG + "ref"]], clone).stdout.strip() == tags[TAG + "commit"]
    restored = file_hashes(clone / "checkpoints/rl")
    assert restored and restored == file_hashes(root / "checkpoints/rl")
    assert yaml.safe_load((clone / "params.yaml").read_text())["rl"]["seed"] == seed
    assert json.loads((clone / "metrics/rl.json").read_text())["registered"] == registered

    # Where the same inputs come back (a pod's fresh clone), DVC restores the outputs from the
    # run-cache the flow pushed instead of running the stage again.
    (clone / "dvc.lock").unlink()
    for folder in (".dvc/cache", "data/prepared"):
        shutil.rmtree(clone / folder)
    # (`restorl` is not on PATH here: a stage that runs instead of being restored fails.)
    again = run([BIN / "dvc", "repro", "--pull", "--single-item", "prepare"], clone)
    assert "Stage 'prepare' is cached - skipping run" in again.stdout + again.stderr, again.stdout
    assert file_hashes(clone / "data/prepared") == file_hashes(root / "data/prepared")


@pytest.mark.e2e
def test_the_same_inputs_again_train_nothing_and_save_nothing(lineage_run):
    root = lineage_run["root"]
    seed = yaml.safe_load((root / "params.yaml").read_text())["rl"]["seed"]
    refs = run(["git", "for-each-ref", "refs/exps/"], root).stdout
    with temporary_settings(updates={PREFECT_API_URL: lineage_run["url"]}):
        state = training_pipeline(profile="smoke", workspace=str(root), promote=True, lineage=True,
                                  overrides={"rl": {"seed": seed}}, retries=0, return_state=True)
    assert state.is_completed(), state.message
    *stages, saved = state.result()
    declared = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    always = {name for name, spec in declared.items() if spec.get("always_changed")}
    assert [r["stage"] for r in stages if r["ran"] and r["stage"] not in always] == []
    assert saved == {"stage": "lineage", "ran": False, "pushed": False}
    assert run(["git", "for-each-ref", "refs/exps/"], root).stdout == refs
