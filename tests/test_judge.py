"""The held-out judge: a second learned reward trained by its own stage on images prepare never
uses, reported by `evaluate` beside the reward, and refused as an RL reward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, write_params


def _sft_and_reward(root: Path, prepared: Path) -> Path:
    """In `root`: the prepared smoke data, a task-conditioned SFT stand-in and a small reward model."""
    from pipeline.models.restorer import PixelRestorer
    from pipeline.models.reward_model import RewardModel
    from pipeline.paths import Paths

    shutil.copytree(prepared / "data", root / "data")
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, list(smoke_params().prepare.degradations.tasks))
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.02)
    model.save_pretrained(Paths(root).sft_model)
    RewardModel(kernels=8, hidden=16).save(Paths(root).reward_model)
    return root


@pytest.fixture(scope="module")
def judged(tmp_path_factory, prepared_smoke) -> tuple[Path, dict]:
    """A workspace where the judge stage has run on the smoke profile, and what it returned."""
    from pipeline.stages import judge

    root = _sft_and_reward(tmp_path_factory.mktemp("judged"), prepared_smoke)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        checks = judge.run(smoke_params(), root)
    return root, checks


def test_the_judge_trains_on_its_own_images_and_checks_on_held_out_patches(judged):
    from pipeline.models.reward_model import RewardModel
    from pipeline.rewards.checks import headline

    root, checks = judged
    params = smoke_params()
    RewardModel.load(root / "checkpoints/judge")  # a model evaluate can load
    written = json.loads((root / "checkpoints/judge/checks.json").read_text())
    assert written == checks
    assert {"gt_above_lq", "gt_above_sft", "mean", "hack_mean", "passed"} <= set(written)
    assert json.loads((root / "metrics/judge.json").read_text()) == headline(checks)
    trained_on = json.loads((root / "checkpoints/judge/sources.json").read_text())
    # smoke: 2 images x 6 patches, a fifth (2) held out, sft_samples (8) of the other 10 trained on
    assert trained_on["patches"] == {"train": 8, "held_out": 2}
    assert trained_on["images"] == sorted(params.judge.source.images) == ["retina", "text"]
    assert not set(trained_on["images"]) & set(params.prepare.source.images)
    assert trained_on["seed"] == params.judge.seed != params.runtime.seed


def test_the_judges_patches_come_from_its_images_and_its_seed_alone():
    from pipeline.stages.judge import judge_patches

    patches = judge_patches(smoke_params())
    assert len(patches) == 12 and {s["source"] for s in patches.samples} == {"retina", "text"}
    assert len(set(patches.tasks)) == 7  # degraded with every task of prepare.degradations, stratified
    # cut as prepare cuts: no crop flatter than prepare.min_patch_std (retina is mostly dark background)
    assert (((patches.gt + 1) / 2).mean(1).std(dim=(1, 2)) >= smoke_params().prepare.min_patch_std).all()
    same = judge_patches(smoke_params(runtime={"seed": 5}))  # runtime.seed (prepare's, the reward's) plays no part
    assert torch.equal(same.gt, patches.gt) and torch.equal(same.lq, patches.lq)
    other = judge_patches(smoke_params(judge={"seed": 2}))
    assert [s["crop"] for s in other.samples] != [s["crop"] for s in patches.samples]


def test_evaluate_reports_the_judge_beside_the_reward_for_every_row(judged, tmp_path, monkeypatch):
    from pipeline.stages import evaluate

    root = tmp_path / "ws"
    shutil.copytree(judged[0], root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", ".restorl"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    fast = {"fr_metrics": ["psnr"], "nr_metrics": [], "frontier": [{"steps": 2, "eta": 0.0, "samples": 1}]}
    metrics = evaluate.run(smoke_params(evaluate=fast), root)
    rows = metrics["overall"]
    assert {"lq", "sft", "gt", "sft_blur"} <= set(rows)
    assert all("judge" in scores and "reward" in scores for scores in rows.values())
    assert all("judge" in versus for versus in metrics["vs_sft"].values())  # paired intervals against SFT
    assert rows["gt"]["judge"] != rows["gt"]["reward"]  # its own model, not the reward's

    shutil.rmtree(root / "checkpoints/judge")  # no judge trained: no judge column, the rest as before
    without = evaluate.run(smoke_params(evaluate=fast), root)
    assert all("judge" not in scores and "reward" in scores for scores in without["overall"].values())
    assert without["overall"]["sft"]["psnr"] == rows["sft"]["psnr"]


def test_a_judge_image_prepare_also_uses_is_one_error_naming_the_key(tmp_path, prepared_smoke):
    root = _sft_and_reward(tmp_path, prepared_smoke)
    raw = smoke_raw()
    raw["judge"]["source"]["images"] = ["retina", "coffee"]  # coffee is the smoke profile's val image
    write_params(root, raw)
    proc = run_tool([str(BIN / "restorl"), "judge"], root, check=False)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "judge.source.images: 'coffee' is also in prepare.source.images" in error[0]
    assert not (root / "checkpoints/judge").exists() and not (root / "metrics/judge.json").exists()
    # skimage's `cat` is `chelsea` (the smoke test image) under another name: refused by its pixels.
    from pipeline.stages.judge import judge_patches

    with pytest.raises(ConfigError, match="judge.source.images: 'cat' is the image 'chelsea' of prepare.source.images"):
        judge_patches(smoke_params(judge={"source": {"images": ["retina", "cat"]}}))
    with pytest.raises(ConfigError, match="judge.source.path: .* is prepare.source.path"):
        smoke_params(prepare={"source": {"kind": "folder", "path": "/photos"}},
                     judge={"source": {"kind": "folder", "path": "/photos"}})
    with pytest.raises(ConfigError, match=r"judge.source: .*kind 'faces'"):
        smoke_params(judge={"source": {"kind": "faces"}})
    # A folder that is not there: its key and its path, before any work.
    from pipeline.data.sources import DataError

    with pytest.raises(DataError, match=f"judge.source.path: {tmp_path}/absent: not a directory"):
        judge_patches(smoke_params(judge={"source": {"kind": "folder", "path": str(tmp_path / "absent")}}))


def test_rl_cannot_train_on_the_judge():
    with pytest.raises(ConfigError, match=r"rl.reward: 'judge' is the held-out judge"):
        smoke_params(rl={"reward": {"learned": 1.0, "judge": 0.5}})


def test_the_held_out_patches_are_none_of_those_trained_on():
    from pipeline.stages.judge import hold_out, judge_patches

    patches = judge_patches(smoke_params())
    train, held_out = hold_out(patches, 0.25, torch.Generator().manual_seed(0))
    train_ids, held_ids = ({s["id"] for s in part.samples} for part in (train, held_out))
    assert len(held_ids) == 3 and not train_ids & held_ids and train_ids | held_ids == {s["id"] for s in patches.samples}
    with pytest.raises(Exception, match="judge.holdout_fraction"):
        hold_out(patches.subset(torch.arange(1)), 0.25, torch.Generator())
