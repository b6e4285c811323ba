"""Pretrained layouts through the pipeline: one full `restorl repro` of the SD-upscaler layout
with LoRA (from an s3:// base on a moto server), and in-process sft -> score -> rl -> evaluate
runs of every other layout / LoRA combination on the smoke workspace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.models.loading import load_restorer
from pipeline.models.reward_model import RewardModel
from pipeline.paths import Paths
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, stand_in_judge, tool_env, write_params
from tests.test_e2e_dvc import _new_workspace
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


def test_dvc_repro_sd_upscaler_with_lora_from_s3(bases, moto, tmp_path, monkeypatch):
    """The whole pipeline on an s3:// base: adapters train, the registered model is the merged
    model, and `models:/restorer@champion` restores in a fresh process."""
    from tests.test_storage import s3 as s3_client

    endpoint, key_id, secret = moto
    for key, value in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = s3_client(moto)
    s3.create_bucket(Bucket="models")
    for path in sorted(bases["sd_upscale"].rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "models", f"x2-upscaler/{path.relative_to(bases['sd_upscale'])}")

    _new_workspace(tmp_path)
    raw = smoke_raw()
    raw["model"] |= {"pretrained": "s3://models/x2-upscaler", "lora": LORA, "prompt": "a photo"}
    raw["storage"] = {"endpoint_url": endpoint}
    write_params(tmp_path, raw)
    result = run_tool([str(BIN / "restorl"), "repro"], tmp_path)
    assert "Running stage 'promote'" in result.stdout

    meta = json.loads((tmp_path / "checkpoints/rl/restorl.json").read_text())
    assert meta["layout"] == "sd_upscale" and meta["prompt"] == "a photo"
    assert meta["base"]["uri"] == "s3://models/x2-upscaler"
    assert sorted(p.name for p in (tmp_path / "checkpoints/rl").iterdir()) == [
        "adapter_rl.safetensors", "adapter_sft.safetensors", "restorl.json"]
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text())["overall"]["rl"]["psnr"] > 0

    script = """
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/restorer@champion")
out = model.predict(np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32), params={"steps": 2})
print(json.dumps({"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=tool_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"shape": [1, 32, 32, 3], "finite": True}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("restorer", "champion")
    assert champion.tags["restorl.layout"] == "sd_upscale" and champion.tags["restorl.adapters"] == "sft,rl"
    assert champion.tags["restorl.base_hash"] == meta["base"]["hash"]

    # The adapters export merged into a plain pipeline folder.
    run_tool([str(BIN / "restorl"), "export", "checkpoints/rl", "exported"], tmp_path)
    assert load_restorer(tmp_path / "exported").layout == "sd_upscale"


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
