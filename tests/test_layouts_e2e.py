"""Pretrained layouts through the pipeline: in-process sft -> score -> rl -> evaluate runs of
every layout / LoRA combination on the smoke workspace. The full `restorl repro` of the
SD-upscaler layout with LoRA on an s3:// base is in tests/test_storage_e2e.py."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.models.loading import load_restorer
from pipeline.models.reward_model import RewardModel
from pipeline.paths import Paths
from tests.conftest import smoke_params, stand_in_judge
from tests.test_storage import moto_fixture  # noqa: F401  (registers the `moto` fixture here)
from tests.tiny_models import save_ldm_sr, save_sd_upscale

pytestmark = pytest.mark.e2e

LORA = {"rank": 2, "alpha": 2.0}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from pipeline.models.restorer import PixelRestorer

    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    pixel = PixelRestorer.build(smoke_params().model)
    torch.nn.init.normal_(pixel.unet.conv_out.weight, std=0.02)
    pixel.save_pretrained(root / "pixel")  # an unconditioned restorl checkpoint as someone's base
    return {"pixel": root / "pixel", "ldm_sr": save_ldm_sr(root / "ldm_sr"),
            "sd_upscale": save_sd_upscale(root / "sd_upscale")}


@pytest.mark.parametrize("layout,adapters", [("pixel", True), ("pixel", False), ("ldm_sr", True),
                                             ("ldm_sr", False), ("sd_upscale", False)])
def test_stages_run_each_layout(bases, workspace, monkeypatch, layout, adapters):
    from pipeline.stages import evaluate, rl, score, sft

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    paths = Paths(workspace)
    RewardModel(kernels=8, hidden=16).save(paths.reward_model)  # a stand-in reward: it scores images
    stand_in_judge(workspace)
    params = smoke_params(model={"pretrained": str(bases[layout]), **({"lora": LORA} if adapters else {})})
    sft.run(params, workspace)
    score.run(params, workspace)
    summary = rl.run(params, workspace)
    evaluate.run(params, workspace)

    rl_meta = json.loads((paths.rl_model / "restorl.json").read_text())
    assert rl_meta.get("layout", "pixel") == layout
    if adapters:
        assert [a["name"] for a in rl_meta["adapters"]] == ["sft", "rl"]
        assert rl_meta["base"]["uri"] == str(bases[layout]) and not (paths.rl_model / "unet").exists()
    else:
        assert (paths.rl_model / "unet/config.json").exists()
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    assert {"sft", "rl"} <= set(metrics["overall"]) and metrics["overall"]["rl"]["psnr"] > 0
    version = MlflowClient().get_model_version("restorer", summary["registered"]["version"])
    assert version.tags["restorl.layout"] == layout
    assert version.tags["restorl.base_uri"] == str(bases[layout])
    assert version.tags["restorl.adapters"] == ("sft,rl" if adapters else "")


def test_super_resolution_from_an_lq_at_the_latent_size(bases, tmp_path, monkeypatch):
    """prepare.lq_scale 2 writes 16 px LQ for 32 px GT; the ldm_sr layout (factor 2) takes them as
    they are and restores 32 px; only the LQ row of the evaluation is upsampled; the pixel layout
    refuses such data."""
    from pipeline.config import ConfigError
    from pipeline.data.dataset import load_split
    from pipeline.stages import evaluate, prepare, rl, score, sft

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepare.run(smoke_params(prepare={"lq_scale": 2}), tmp_path)
    paths = Paths(tmp_path)
    train = load_split(paths.data, "train")
    assert train.gt.shape[-1] == 32 and train.lq.shape[-1] == 16 and train.lq_scale == 2
    RewardModel(kernels=8, hidden=16).save(paths.reward_model)
    stand_in_judge(tmp_path)
    with pytest.raises(ConfigError, match="prepare.lq_scale is 2: the pixel layout takes the LQ at the GT's size"):
        sft.run(smoke_params(prepare={"lq_scale": 2}), tmp_path)

    params = smoke_params(prepare={"lq_scale": 2}, model={"pretrained": str(bases["ldm_sr"]), "lora": LORA})
    sft.run(params, tmp_path)
    score.run(params, tmp_path)
    rl.run(params, tmp_path)
    evaluate.run(params, tmp_path)
    model = load_restorer(paths.rl_model)
    assert model.lq_scale == 2
    with torch.no_grad():
        out = model.restore(train.lq[:2], steps=2)
    assert out.shape == train.gt[:2].shape
    metrics = json.loads((paths.metrics / "evaluate_detail.json").read_text())["overall"]  # the LQ row: detail
    test = load_split(paths.data, "test")
    from pipeline.rewards import iqa

    assert metrics["lq"]["psnr"] == pytest.approx(float(iqa.score("psnr", test.lq_full, test.gt).mean()), abs=1e-3)
    assert metrics["rl"]["psnr"] > 0
