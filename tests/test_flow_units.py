"""The flow's pieces without a Prefect server: stage order, params, failure classes, artifacts, serve."""

import json
import shutil

import pytest
import yaml

from flows import serve
from flows.training import (
    PARAMS_BASE,
    PARAMS_MARKER,
    StageTransientError,
    StageUserError,
    artifact_key,
    cli_has_command,
    materialise_params,
    run_logged,
    stage_markdown,
    stage_order,
)
from pipeline.config import ConfigError
from tests.conftest import REPO


def _dvc_yaml(tmp_path, stages: dict) -> object:
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return path


def test_stage_order_of_the_repo_follows_its_data():
    order = stage_order(REPO / "dvc.yaml")
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(declared)
    assert order.index("prepare") < order.index("sft") < order.index("evaluate")


def test_stage_order_picks_up_new_stages_in_dependency_order(tmp_path):
    # File order is deliberately not the run order: rl is written before the stages it reads.
    path = _dvc_yaml(tmp_path, {
        "evaluate": {"cmd": "e", "deps": ["data/prepared", "checkpoints/rl"], "metrics": [{"m.json": {"cache": False}}]},
        "rl": {"cmd": "r", "deps": ["data/difficulty", "checkpoints/sft/", "checkpoints/reward"],
               "outs": ["checkpoints/rl"]},
        "prepare": {"cmd": "p", "outs": ["data/prepared"]},
        "sft": {"cmd": "s", "deps": ["data/prepared/train"], "outs": ["checkpoints/sft"]},
        "reward": {"cmd": "w", "deps": ["data/prepared", "checkpoints/sft"], "outs": ["checkpoints/reward"]},
        "score": {"cmd": "c", "deps": ["checkpoints/sft", "checkpoints/reward"], "outs": ["data/difficulty"]},
        "promote": {"cmd": "restorl promote", "deps": ["m.json"]},
    })
    assert stage_order(path) == ["prepare", "sft", "reward", "score", "rl", "evaluate", "promote"]


def test_stage_order_names_a_cycle(tmp_path):
    path = _dvc_yaml(tmp_path, {"a": {"cmd": "a", "deps": ["y"], "outs": ["x"]},
                                "b": {"cmd": "b", "deps": ["x"], "outs": ["y"]}})
    with pytest.raises(StageUserError, match=r"cycle: \['a', 'b'\]"):
        stage_order(path)


def test_params_merge_profile_and_overrides_and_restore(tmp_path):
    original = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)

    raw = materialise_params(tmp_path, "smoke", {"sft": {"steps": 3}})
    written = (tmp_path / "params.yaml").read_text()
    assert written.startswith(PARAMS_MARKER)
    assert yaml.safe_load(written) == raw
    assert raw["sft"]["steps"] == 3 and raw["model"]["block_out_channels"] == [8, 16, 16]  # smoke
    assert (tmp_path / PARAMS_BASE).read_text() == original

    # A second run starts from the original file, not from the first run's overrides.
    raw = materialise_params(tmp_path, "smoke", {"sft": {"batch_size": 2}})
    assert raw["sft"]["steps"] == yaml.safe_load((REPO / "pipeline/profiles/smoke.yaml").read_text())["sft"]["steps"]
    # No profile, no overrides: the user's file comes back verbatim.
    materialise_params(tmp_path, None, {})
    assert (tmp_path / "params.yaml").read_text() == original


def test_bad_override_names_the_key_and_leaves_params_alone(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"sft\.stepz: unknown key"):
        materialise_params(tmp_path, None, {"sft": {"stepz": 3}})
    with pytest.raises(ConfigError, match="profile 'nope' not found"):
        materialise_params(tmp_path, "nope", {})
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()


def test_failures_are_classified_by_exit_code(tmp_path):
    # exit 2 is restorl's user error; DVC wraps it as "... exited with 2" in its own exit 255.
    with pytest.raises(StageUserError, match="error: no such image"):
        run_logged(["sh", "-c", "echo 'error: no such image' >&2; exit 2"], tmp_path, "prepare")
    with pytest.raises(StageUserError, match="failed to reproduce"):
        run_logged(["sh", "-c", "echo \"ERROR: failed to reproduce 'x': failed to run: y, exited with 2\"; exit 255"],
                   tmp_path, "x")
    with pytest.raises(StageTransientError, match="exited with 1"):
        run_logged(["sh", "-c", "echo killed; exit 1"], tmp_path, "sft")
    with pytest.raises(StageTransientError, match="cannot start"):
        run_logged([str(tmp_path / "no-such-program")], tmp_path, "sft")
    assert run_logged(["sh", "-c", "echo fine"], tmp_path, "sft") == "fine\n"


def test_cli_command_detection():
    assert cli_has_command(REPO, "sft")
    assert not cli_has_command(REPO, "no-such-command")


def test_markdown_artifact_holds_metrics_and_mlflow_link(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(
        {"n_test": 7, "overall": {"sft": {"psnr": 27.0244}}, "cuda": True, "tasks": ["noise"], "note": "x"}))
    (tmp_path / ".restorl/runs").mkdir(parents=True)
    (tmp_path / ".restorl/runs/evaluate.json").write_text(json.dumps(
        {"run_id": "abc123", "experiment_id": "4", "tracking_uri": "http://mlflow.internal:5000"}))
    text = stage_markdown(tmp_path, "evaluate", {"ran": True, "seconds": 1.5, "pushed": False})
    assert "[abc123](http://mlflow.internal:5000/#/experiments/4/runs/abc123)" in text
    assert "| evaluate.json:overall.sft.psnr | 27.02 |" in text and "| evaluate.json:n_test | 7 |" in text
    assert "ran in 1.5 s" in text
    assert "cuda" not in text and "tasks" not in text and "note" not in text  # numbers only
    assert artifact_key("Score_2") == "restorl-score-2"


def test_serve_builds_the_deployments_of_prefect_yaml():
    specs = serve.deployment_specs()
    deployments = serve.runner_deployments(specs, workspace=REPO)
    assert [d.name for d in deployments] == [s["name"] for s in specs]
    for spec, dep in zip(specs, deployments):
        assert dep.parameters == {**spec.get("parameters", {}), "workspace": str(REPO)}
        assert set(dep.tags) == set(spec["tags"])
        assert dep.concurrency_limit == spec["concurrency_limit"]["limit"] == 1
        crons = [s.schedule.cron for s in dep.schedules]
        assert crons == [s["cron"] for s in spec.get("schedules", [])]
    assert sum(bool(d.schedules) for d in deployments) >= 2  # nightly and weekly


def test_a_git_ref_that_looks_like_an_option_is_refused_before_git_sees_it(tmp_path):
    """`--upload-pack=CMD` as a ref would make `git fetch` run CMD."""
    import subprocess

    from flows.training import StageUserError, checkout

    (tmp_path / "origin").mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path / "origin")], check=True)
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin"), str(tmp_path / "ws")], check=True,
                   capture_output=True)
    marker = tmp_path / "pwned"
    with pytest.raises(StageUserError, match="starts with '-': refusing it"):
        checkout(tmp_path / "ws", f"--upload-pack=touch {marker};true")
    assert not marker.exists()
