"""The flow and its deployments against a real `prefect server start` (SQLite in a temp dir).

One server for the session; flows run in this process with PREFECT_API_URL pointing at it.
One flow run from scratch (with promote and lineage, against moto S3 and a bare git remote)
serves the flow's tests: what it ran and published, the lineage a fresh clone restores, what a
second run skips, a retried transient fault.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
import zc.lockfile
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.base import BaseJobConfiguration

from flows.local_server import PREFECT, local_server, server_env
from flows.training import PROMOTE, artifact_key, stage_order, training_pipeline
from pipeline.lineage import TAG
from tests.conftest import BIN, REPO
from tests.test_storage import moto_fixture, s3  # noqa: F401  (registers the `moto` fixture here)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    with local_server(home) as url:
        yield url, home


@pytest.fixture
def api(prefect_api):
    url, _ = prefect_api
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def _run(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def new_workspace(root: Path, remote: Path | None = None) -> Path:
    """A git+DVC workspace holding this repo's pipeline, as a deployment's clone would."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], root)
    _run([BIN / "dvc", "init", "-q"], root)
    if remote:
        _run([BIN / "dvc", "remote", "add", "-d", "store", remote], root)
    return root


def _pipeline_stages(root: Path) -> list[str]:
    return [s for s in stage_order(root / "dvc.yaml") if s != PROMOTE]


def _task_runs(flow_run_id) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


# ---------------------------------------------------------------------------------------------
# deployments and schedules


def _cron_matches(cron: str, tz: str, when) -> bool:
    """Whether `when` fits the minute, hour and weekday fields of a simple cron (numbers or *)."""
    minute, hour, _, _, weekday = cron.split()
    local = when.astimezone(ZoneInfo(tz))
    return ((minute == "*" or local.minute == int(minute)) and (hour == "*" or local.hour == int(hour))
            and (weekday == "*" or (local.isoweekday() % 7) == int(weekday)))


def test_deploy_schedules_runs_with_parameters(prefect_api, tmp_path):
    url, home = prefect_api
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    # `prefect deploy` reads prefect.yaml and imports the entrypoint from its directory.
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    shutil.copytree(REPO / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra", tmp_path / "infra")
    env = server_env(home, url) | {"RESTORL_GIT_REPO": "https://git.example/restorl.git",
                                   "RESTORL_GIT_REF": "release-7", "RESTORL_IMAGE": "registry.example/restorl:7"}
    _run([PREFECT, "work-pool", "create", "gpu", "--type", "kubernetes", "--overwrite",
          "--base-job-template", "infra/k8s/gpu-base-job-template.json"], tmp_path, env)
    _run([PREFECT, "work-pool", "create", "local", "--type", "process", "--overwrite"], tmp_path, env)
    _run([PREFECT, "--no-prompt", "deploy", "--all"], tmp_path, env)

    specs = {d["name"]: d for d in config["deployments"]}
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(specs) <= set(deployments)
        for name, spec in specs.items():
            dep = deployments[name]
            assert dep.parameters == spec["parameters"], name
            assert set(dep.tags) == set(spec["tags"]), name
            assert dep.global_concurrency_limit.limit == 1, name
            assert dep.work_pool_name == spec["work_pool"]["name"], name
        nightly = deployments["nightly-rl-finetune"]
        clone = nightly.pull_steps[0]["prefect.deployments.steps.git_clone"]
        assert (clone["repository"], clone["branch"]) == ("https://git.example/restorl.git", "release-7")
        assert nightly.job_variables["image"] == "registry.example/restorl:7"

        # The scheduler service (absent from prefect_test_harness) makes the runs by itself.
        scheduled = {n: s for n, s in specs.items() if s.get("schedules")}
        ids = [deployments[n].id for n in scheduled]
        deadline = time.monotonic() + 90
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
            by_dep = {dep_id: [r for r in runs if r.deployment_id == dep_id] for dep_id in ids}
            if all(by_dep.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        for name, spec in scheduled.items():
            runs = by_dep[deployments[name].id]
            assert runs, f"the scheduler made no run for {name}"
            [schedule] = spec["schedules"]
            for run in runs:
                assert run.state.type.value == "SCHEDULED" and run.state.name == "Scheduled"
                assert run.parameters == spec["parameters"]
                assert _cron_matches(schedule["cron"], schedule["timezone"], run.expected_start_time), \
                    f"{name}: {run.expected_start_time} does not fit {schedule['cron']}"
        unscheduled = [deployments[n].id for n in specs if n not in scheduled]
        assert not client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=unscheduled)))

        # What a Kubernetes worker would build for the weekly run: the server's copy of the
        # pool template, filled with the deployment's job variables by Prefect's own templating.
        pool = client.read_work_pool("gpu")
        assert pool.type == "kubernetes"
        weekly = deployments["weekly-full-retrain"]

        class KubernetesLikeJob(BaseJobConfiguration):
            job_manifest: dict[str, Any]

        job = asyncio.run(_from_template(KubernetesLikeJob, pool.base_job_template, weekly.job_variables, url))
        [container] = job.job_manifest["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == specs["weekly-full-retrain"]["work_pool"][
            "job_variables"]["gpu_count"]
        assert container["image"] == "registry.example/restorl:7"


async def _from_template(cls, template, values, url):
    with temporary_settings(updates={PREFECT_API_URL: url}):
        from prefect.client.orchestration import get_client as get_async_client

        async with get_async_client() as client:
            return await cls.from_template_and_values(template, values, client=client)


# ---------------------------------------------------------------------------------------------
# the flow, end to end on the smoke profile


def saved_workspace(root: Path, bare: Path, endpoint: str) -> None:
    """Commit the workspace and give it a git remote `origin` (a bare repository) and an S3 DVC
    remote (endpoint machine-local), as a scheduled deployment's clone has."""
    _run([BIN / "restorl", "remote", "s3://lineage/store", "--endpoint", endpoint], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "pipeline"], root)
    _run(["git", "init", "-q", "--bare", bare], root)
    _run(["git", "remote", "add", "origin", bare], root)
    _run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], root)


def drain_prefect_queues() -> None:
    """Send the queued flow logs and events while the server still runs: sent after it stopped,
    they hold the test process's exit in retries."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(prefect_api, moto, tmp_path_factory):
    """One flow run from scratch, as the weekly deployment makes it: smoke profile, a fresh rl
    seed, promote, lineage; outputs pushed to an S3 DVC remote (moto), the experiment to a bare
    git remote. The S3 keys stay in the environment while the module's tests run."""
    url, _ = prefect_api
    endpoint, key_id, secret = moto
    s3(moto).create_bucket(Bucket="lineage")
    base = tmp_path_factory.mktemp("flow")
    root, bare = new_workspace(base / "ws"), base / "remote.git"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                            "AWS_DEFAULT_REGION": "us-east-1", "DVC_NO_ANALYTICS": "1"}.items():
            env.setenv(name, value)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # each workspace its own mlflow.db
        saved_workspace(root, bare, endpoint)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            start = time.perf_counter()
            state = training_pipeline(profile="smoke", workspace=str(root), promote=True, lineage=True,
                                      fresh_seed="rl.seed", retries=1, retry_delay_s=1, return_state=True)
            seconds = time.perf_counter() - start
        yield {"root": root, "bare": bare, "endpoint": endpoint, "state": state, "seconds": seconds,
               "seed": yaml.safe_load((root / "params.yaml").read_text())["rl"]["seed"]}
        drain_prefect_queues()


def test_flow_runs_every_stage_and_publishes(built, api):
    root, state = built["root"], built["state"]
    assert state.is_completed(), state.message
    *results, promoted, saved = state.result()
    stages = _pipeline_stages(root)
    assert [r["stage"] for r in results] == stages
    assert all(r["ran"] and r["pushed"] for r in results)
    assert promoted["stage"] == PROMOTE and promoted["ran"] and promoted["pushed"]
    assert saved["stage"] == "lineage" and saved["pushed"], saved

    # DVC owns the result: every stage is in the lock file and nothing is out of date.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(stages) <= set(lock["stages"])
    # `source` lists the source images on every run (always_changed); the rest is up to date.
    built_stages = [s for s in stages if s != "source"]
    status = _run([BIN / "dvc", "status", *built_stages], root).stdout
    assert "up to date" in status, status
    assert "always changed" in _run([BIN / "dvc", "status", "source"], root).stdout
    assert (root / "checkpoints/sft").is_dir() and (root / "plots/eval_grid.png").stat().st_size > 0
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["n_test"] == 7  # the smoke profile's test patches, so the profile was applied
    # Pushed: the S3 remote holds every cached output DVC lists for the stages.
    remote_status = _run([BIN / "dvc", "status", "--cloud", *stages], root).stdout
    assert "are in sync" in remote_status, remote_status

    # One markdown artifact per stage, with its metrics and a link to its MLflow run.
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {artifact_key(s) for s in [*stages, PROMOTE, "lineage"]} <= set(by_key)
    for stage in built_stages:  # `source` only lists files: no MLflow run
        info = json.loads((root / f".restorl/runs/{stage}.json").read_text())
        text = by_key[artifact_key(stage)].data
        assert by_key[artifact_key(stage)].type == "markdown"
        assert f"[{info['run_id']}](" in text and f"/runs/{info['run_id']})" in text, text
    evaluate_md = by_key[artifact_key("evaluate")].data
    assert f"| evaluate.json:overall.sft.psnr | {metrics['overall']['sft']['psnr']:.4g} |" in evaluate_md
    assert "ran in" in evaluate_md


def test_a_fresh_clone_restores_the_promoted_checkpoint_from_the_mlflow_tag(built, tmp_path):
    """The run's lineage: saved as a DVC experiment on the git remote, its checkpoints on the DVC
    remote, the MLflow runs and versions name it, and a fresh clone restores the promoted
    checkpoint from that name alone."""
    root, state = built["root"], built["state"]
    saved = state.result()[-1]

    # The promoted version is the one the rl stage registered; it and its run carry the reference.
    registered = json.loads((root / "metrics/rl.json").read_text())["registered"]
    promote = json.loads((root / "metrics/promote.json").read_text())
    assert promote["outcome"] == "promoted" and promote["challenger"] == registered["version"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    tags = client.get_model_version(registered["model"], registered["version"]).tags
    run_tags = client.get_run(registered["run_id"]).data.tags
    for key in ("name", "ref", "commit", "git_remote"):
        assert tags[TAG + key] == run_tags[TAG + key] == saved[TAG + key], key
    assert tags[TAG + "git_remote"] == str(built["bare"])
    seed = int(tags["restorl.fresh_seed"].removeprefix("rl.seed="))
    assert seed == built["seed"] and run_tags["restorl.fresh_seed"] == tags["restorl.fresh_seed"]
    assert client.get_run(registered["run_id"]).data.params["rl.seed"] == str(seed)

    # Nothing but the tag: clone the git remote, pull the experiment, apply it.
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", "-b", "main", built["bare"], clone], tmp_path)
    _run([BIN / "dvc", "remote", "modify", "--local", "store", "endpointurl", built["endpoint"]], clone)
    _run([BIN / "dvc", "exp", "pull", "origin", tags[TAG + "name"]], clone)
    _run([BIN / "dvc", "exp", "apply", tags[TAG + "name"]], clone)
    assert _run(["git", "rev-parse", tags[TAG + "ref"]], clone).stdout.strip() == tags[TAG + "commit"]
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
    again = _run([BIN / "dvc", "repro", "--pull", "--single-item", "prepare"], clone)
    assert "Stage 'prepare' is cached - skipping run" in again.stdout + again.stderr, again.stdout
    assert file_hashes(clone / "data/prepared") == file_hashes(root / "data/prepared")


def test_second_run_skips_up_to_date_stages_and_saves_nothing(built, api):
    root = built["root"]
    lock_before = (root / "dvc.lock").read_text()
    runs_before = {p.name: p.read_text() for p in (root / ".restorl/runs").glob("*.json")}
    refs = _run(["git", "for-each-ref", "refs/exps/"], root).stdout
    start = time.perf_counter()
    # The same inputs (the seed the first run drew), not asked to promote this time.
    state = training_pipeline(profile="smoke", workspace=str(root), lineage=True, overrides={"rl": {"seed": built["seed"]}},
                              retries=1, retry_delay_s=1, return_state=True)
    seconds = time.perf_counter() - start
    assert state.is_completed(), state.message
    *results, promoted, saved = state.result()
    # Only `source` runs (always_changed): the same listing leaves every other stage up to date.
    assert {r["stage"]: r["ran"] for r in results} == {s: s == "source" for s in _pipeline_stages(root)}
    assert promoted["skipped"] == "not requested" and not promoted["ran"]
    assert saved == {"stage": "lineage", "ran": False, "pushed": False}  # dvc.lock unchanged: nothing saved
    assert _run(["git", "for-each-ref", "refs/exps/"], root).stdout == refs
    assert (root / "dvc.lock").read_text() == lock_before
    assert {p.name: p.read_text() for p in (root / ".restorl/runs").glob("*.json")} == runs_before  # no new MLflow run
    print(f"first run {built['seconds']:.1f} s, second run {seconds:.1f} s")
    assert seconds < 0.5 * built["seconds"], (seconds, built["seconds"])


# ---------------------------------------------------------------------------------------------
# faults


def test_transient_failure_is_retried(built, prefect_api, api, tmp_path):
    """A real transient fault, no mock: another process holds DVC's repository lock."""
    url, home = prefect_api
    root = tmp_path / "ws"
    shutil.copytree(built["root"], root, symlinks=True)
    first = _pipeline_stages(root)[0]
    name = f"lock-{uuid.uuid4().hex[:8]}"
    lock = zc.lockfile.LockFile(str(root / ".dvc/tmp/lock"))
    # The flow runs in its own process, as under a worker, so this one can watch and unlock.
    # (The built run's seed again: only the always-changed `source` has anything to do.)
    script = (f"from flows.training import training_pipeline as f; f.with_options(flow_run_name={name!r})"
              f"(profile='smoke', workspace={str(root)!r}, push=False, retries=3, retry_delay_s=3, "
              f"overrides={{'rl': {{'seed': {built['seed']}}}}})")
    with open(tmp_path / "flow.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=server_env(home, url),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        # Unlock once the stage waits for its retry (polled every 0.5 s; each wait lasts 3, 6
        # then 12 s, so it is seen before the retries run out). The deadline only bounds a flow
        # that never gets there: a slow start on a busy machine must not unlock too early.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            run = _flow_run_named(name)
            task_run = run and _task_runs(run.id).get(first)
            if task_run and task_run.state.name in ("AwaitingRetry", "Retrying"):
                break
            time.sleep(0.5)
    finally:
        lock.close()
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:  # never leave a flow running after the test
            proc.kill()
    assert code == 0, (tmp_path / "flow.log").read_text()[-3000:]
    run = _flow_run_named(name)
    assert run.state.is_completed(), run.state.message
    task_run = _task_runs(run.id)[first]
    assert task_run.run_count >= 2 and task_run.state.is_completed()
    with get_client(sync_client=True) as client:
        history = client.read_task_run_states(task_run.id)
    assert {"AwaitingRetry", "Retrying"} & {s.name for s in history}, [s.name for s in history]
    # The retried failure was DVC's lock (the flow process's own log; states carry no message).
    log = (tmp_path / "flow.log").read_text()
    assert "Unable to acquire lock" in log and "StageTransientError" in log


def _flow_run_named(name: str):
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None


def test_bad_override_fails_at_once(api, tmp_path):
    root = new_workspace(tmp_path / "ws")
    params_before = (root / "params.yaml").read_text()
    state = training_pipeline(overrides={"sft": {"stepz": 3}}, workspace=str(root), retries=3,
                              retry_delay_s=60, return_state=True)
    assert state.is_failed()
    assert "sft.stepz: unknown key" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.name.split("-")[0] for r in runs.values()] == ["params"]  # no stage started
    assert next(iter(runs.values())).run_count == 1
    assert not (root / "dvc.lock").exists() and (root / "params.yaml").read_text() == params_before


def test_stage_user_error_is_not_retried(api, tmp_path):
    root = new_workspace(tmp_path / "ws")
    missing = tmp_path / "no-images-here"
    start = time.perf_counter()
    # Valid params (the schema cannot know the folder is absent): the first stage (`source`,
    # listing the images) exits 2.
    state = training_pipeline(profile="smoke", overrides={"prepare": {"source": {"kind": "folder", "path": str(missing)}}},
                              workspace=str(root), retries=3, retry_delay_s=60, return_state=True)
    assert state.is_failed()
    assert f"error: prepare.source.path: {missing} is not a directory" in state.message, state.message
    first = _pipeline_stages(root)[0]
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs[first].run_count == 1 and runs[first].state.is_failed()
    assert set(runs) & set(_pipeline_stages(root)) == {first}  # nothing after it ran
    assert time.perf_counter() - start < 60  # no retry delay was waited


def test_unknown_git_ref_fails_at_once(api, tmp_path):
    root = new_workspace(tmp_path / "ws")
    state = training_pipeline(git_ref="no-such-branch", workspace=str(root), return_state=True)
    assert state.is_failed() and "git ref 'no-such-branch' not found" in state.message
    assert not _task_runs(state.state_details.flow_run_id)
