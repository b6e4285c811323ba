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


STAGES = ("prepare", "sft", "reward", "judge", "score", "rl", "evaluate", "promote")


def _ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_dvc_repro_end_to_end(tmp_path):
    _new_workspace(tmp_path)

    first = run_tool([str(BIN / "restorl"), "repro"], tmp_path)
    assert _ran_stages(first.stdout) == list(STAGES)
    # The headline `dvc metrics show` lists: SFT and RL overall, RL against SFT.
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["n_test"] == 7 and set(metrics) == {"n_test", "overall", "rl_vs_sft"}
    assert set(metrics["overall"]) == {"sft", "rl"}
    for row in ("sft", "rl"):
        assert {"psnr", "ssim", "piqe", "reward", "judge", "realism"} <= set(metrics["overall"][row])
    # the held-out judge, paired against SFT: its difference and the verdict of its interval
    assert set(metrics["rl_vs_sft"]["judge"]) == {"diff", "verdict"}
    assert metrics["rl_vs_sft"]["psnr"]["verdict"] in ("better", "worse", "unclear")
    assert set(metrics["rl_vs_sft"]["ssim"]) == {"diff"}
    # The detail: every row, per task, every interval.
    detail = json.loads((tmp_path / "metrics/evaluate_detail.json").read_text())
    controls = {"sft_dither", "sft_unsharp", "sft_blur", "sft_contrast"}
    assert {"lq", "sft", "rl", "gt"} | controls <= set(detail["overall"])
    for row in ["sft", "rl", *controls]:
        assert {"psnr", "ssim", "piqe", "reward", "judge"} <= set(detail["overall"][row])
    assert {"piqe", "reward", "judge"} <= set(detail["overall"]["gt"])
    assert set(detail["vs_sft"]["rl"]["judge"]) == {"diff", "lo", "hi"}
    assert set(detail["per_task"]["gaussian_noise"]) >= {"n", "rl", "sft_blur"}
    assert set(detail["vs_sft"]) == {"rl"} | controls
    assert set(detail["per_task_vs_sft"]["gaussian_noise"]) == {"rl"} | controls
    shown = run_tool([str(BIN / "dvc"), "metrics", "show", "--json"], tmp_path).stdout
    files = next(iter(json.loads(shown).values()))["data"]
    assert "metrics/evaluate_detail.json" not in files and "metrics/evaluate.json" in files
    assert not {"sft_blur", "per_task", "lo", "higher_is_better"} & set(json.dumps(files).replace('"', " ").split())

    # reward, judge, score and rl made their outputs.
    assert (tmp_path / "checkpoints/reward/model.safetensors").exists()
    assert (tmp_path / "checkpoints/judge/model.safetensors").exists()
    assert json.loads((tmp_path / "checkpoints/judge/sources.json").read_text())["patches"]["held_out"] >= 1
    assert json.loads((tmp_path / "metrics/reward.json").read_text())["gt_above_lq"] >= 0
    table = (tmp_path / "data/difficulty.csv").read_text().splitlines()
    assert table[0].startswith("index,id,task,reward_output,reward_gt") and len(table) == 1 + 16
    assert (tmp_path / "plots/difficulty_hist.png").stat().st_size > 0
    rl = json.loads((tmp_path / "metrics/rl.json").read_text())
    assert rl["rollouts"] == 2 * 2 * 2 and 0 <= rl["best_epoch"] <= 2
    # The epochs were also scored on val by the judge stage's model (rl.judge_guard).
    assert "val_judge_drop" in rl and "val_judge" in (tmp_path / "plots/rl_curves.csv").read_text().splitlines()[0]
    assert (tmp_path / "checkpoints/rl/unet/diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "plots/rl_curves.csv").read_text().startswith("epoch,")
    assert not (tmp_path / "checkpoints/resume/rl/state.pt").exists()
    assert (tmp_path / "plots/eval_grid.png").stat().st_size > 0
    assert (tmp_path / "plots/sft_loss.csv").read_text().startswith("step,loss")
    assert "Test split" in first.stdout and "overall" in first.stdout

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("restorl")
    runs = {r.data.tags["restorl.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", *STAGES}
    parent = runs["pipeline"].info.run_id
    for stage in STAGES:
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent, stage
    assert runs["sft"].data.params["sft.steps"] == "12"
    assert "sft.psnr" in runs["evaluate"].data.metrics and "rl.reward" in runs["evaluate"].data.metrics
    assert {"kl", "clip_frac", "val_psnr", "weight_rl", "reward.final.std"} <= set(runs["rl"].data.metrics)
    versions = {str(v.version): v for v in client.search_model_versions("name='restorer'")}
    assert set(versions) == {"1", "2"}
    sft_tags, rl_tags = versions["1"].tags, versions["2"].tags
    assert sft_tags["restorl.stage"] == "sft" and sft_tags["restorl.run_id"] == runs["sft"].info.run_id
    assert rl_tags["restorl.stage"] == "rl" and rl_tags["restorl.run_id"] == runs["rl"].info.run_id
    assert len(rl_tags["restorl.data_hash"]) == 16 and len(rl_tags["restorl.params_hash"]) == 16

    # The RL model is the challenger (and, first of all, promoted); it restores through pyfunc.
    assert str(client.get_model_version_by_alias("restorer", "challenger").version) == "2"
    promote = json.loads((tmp_path / "metrics/promote.json").read_text())
    assert promote["challenger"] == "2" and "judge" in promote["figures"]["challenger"]  # promote.judge_guard
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

    # An RL param changed: rl runs again, nothing before it does (what follows runs only if the
    # shipped model changed: a run whose best epoch is still the SFT model's leaves it as it was).
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["rl"]["epochs"] = 1
    write_params(tmp_path, raw)
    third = run_tool([str(BIN / "dvc"), "repro"], tmp_path)
    assert _ran_stages(third.stdout)[0] == "rl" and set(_ran_stages(third.stdout)) <= {"rl", "evaluate", "promote"}
    assert len(client.search_model_versions("name='restorer'")) == 3
    assert str(client.get_model_version_by_alias("restorer", "challenger").version) == "3"
