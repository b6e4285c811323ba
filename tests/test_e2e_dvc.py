"""`dvc repro` of the smoke profile in a fresh git+DVC workspace, as a user runs it."""

import json
import shutil

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, REPO, run_tool, smoke_raw, write_params

pytestmark = pytest.mark.e2e


def _new_workspace(root):
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    write_params(root, smoke_raw())
    run_tool(["git", "init", "-q"], root)
    run_tool([str(BIN / "dvc"), "init", "-q"], root)


def _ran_stages(output: str) -> list[str]:
    return [s for s in ("prepare", "sft", "evaluate", "promote") if f"Running stage '{s}'" in output]


def test_dvc_repro_end_to_end(tmp_path):
    _new_workspace(tmp_path)

    first = run_tool([str(BIN / "restorl"), "repro"], tmp_path)
    assert _ran_stages(first.stdout) == ["prepare", "sft", "evaluate", "promote"]
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["n_test"] == 7
    assert {"lq", "sft", "gt"} <= set(metrics["overall"])
    assert {"psnr", "ssim", "piqe"} <= set(metrics["overall"]["sft"])
    assert (tmp_path / "plots/eval_grid.png").stat().st_size > 0
    assert (tmp_path / "plots/sft_loss.csv").read_text().startswith("step,loss")
    assert "Test split" in first.stdout and "overall" in first.stdout

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("restorl")
    runs = {r.data.tags["restorl.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", "prepare", "sft", "evaluate", "promote"}
    parent = runs["pipeline"].info.run_id
    assert runs["sft"].data.tags["mlflow.parentRunId"] == parent
    assert runs["evaluate"].data.tags["mlflow.parentRunId"] == parent
    assert runs["sft"].data.params["sft.steps"] == "12"
    assert "sft.psnr" in runs["evaluate"].data.metrics
    versions = client.search_model_versions("name='restorer'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["restorl.stage"] == "sft" and tags["restorl.run_id"] == runs["sft"].info.run_id
    assert len(tags["restorl.data_hash"]) == 16 and len(tags["restorl.params_hash"]) == 16

    # The registered model restores an image through the pyfunc flavour.
    assert str(client.get_model_version_by_alias("restorer", "challenger").version) == "1"
    model = mlflow.pyfunc.load_model("models:/restorer@challenger")
    import numpy as np

    batch = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    task = json.loads((tmp_path / "data/prepared/manifest.json").read_text())["samples"][0]["task"]
    restored = model.predict(batch, params={"task": task, "steps": 3})
    assert restored.shape == (2, 16, 16, 3) and np.isfinite(restored).all()
    with pytest.raises(Exception, match="name the task"):
        model.predict(batch)

    # Nothing changed: nothing runs.
    second = run_tool([str(BIN / "dvc"), "repro"], tmp_path)
    assert _ran_stages(second.stdout) == []

    # An SFT param changed: sft and evaluate run again, prepare does not.
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["sft"]["steps"] = 8
    write_params(tmp_path, raw)
    third = run_tool([str(BIN / "dvc"), "repro"], tmp_path)
    assert _ran_stages(third.stdout) == ["sft", "evaluate", "promote"]
    assert len(client.search_model_versions("name='restorer'")) == 2
    assert str(client.get_model_version_by_alias("restorer", "challenger").version) == "2"
