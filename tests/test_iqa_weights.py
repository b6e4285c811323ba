"""Learned pyiqa metrics from a local weight cache, through pyiqa's own loading code.

Two of pyiqa's learned architectures (CNNIQA and MUSIQ, both fine on 32 px patches) are built
without pretrained weights; their state dicts go, under the file names pyiqa looks for, to an
S3 prefix on the moto server; `restorl weights sync` fills a temporary cache from it; rewards
and evaluation scores are then built from that cache. A missing file is one `MetricError`
naming the metric and the file, raised instead of a download.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from pyiqa.archs import cnniqa_arch, musiq_arch

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.data.dataset import PairedSplit
from pipeline.models.reward_model import RewardModel
from pipeline.paths import Paths
from pipeline.rewards import iqa
from pipeline.rewards.scorers import build_reward, load_reward
from pipeline.scoring import score_outputs
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, write_params
from tests.test_storage import creds, make_bucket, moto_fixture, s3  # noqa: F401  (registers the `creds` and `moto` fixtures here)


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """A guard, not a stand-in: pyiqa downloads a missing weight file with torch.hub's
    `download_url_to_file`, which opens the URL with `torch.hub.urlopen`. restorl must refuse
    before that; if it ever gets this far, the test fails here instead of reaching the network
    (`pytest.fail` is not an `Exception`, so no error handler can swallow it)."""
    def reached_the_network(url, *args, **kwargs):
        pytest.fail(f"a download was started: {getattr(url, 'full_url', url)}")

    monkeypatch.setattr(torch.hub, "urlopen", reached_the_network)


def pyiqa_file_name(arch_module, metric: str) -> str:
    """The file name pyiqa's `load_file_from_url` looks for: the last part of the URL of the
    metric's default checkpoint (`default_model_urls[<its 'pretrained' option>]`)."""
    key = iqa.pyiqa_config(metric)["metric_opts"]["pretrained"]
    return Path(urlparse(arch_module.default_model_urls[key]).path).name


def untrained_networks() -> dict[str, tuple[torch.nn.Module, str, dict]]:
    """metric -> (its architecture with fresh weights, the file pyiqa expects, that file's content)."""
    torch.manual_seed(0)
    cnniqa = cnniqa_arch.CNNIQA(pretrained=None).eval()
    musiq = musiq_arch.MUSIQ(pretrained=False).eval()
    # Each architecture reads its own layout: CNNIQA the state dict under "params", MUSIQ the bare one.
    return {"cnniqa": (cnniqa, pyiqa_file_name(cnniqa_arch, "cnniqa"), {"params": cnniqa.state_dict()}),
            "musiq": (musiq, pyiqa_file_name(musiq_arch, "musiq"), musiq.state_dict())}


def upload(moto, networks: dict, prefix: str) -> str:
    make_bucket(moto, "weights")
    for _, file_name, content in networks.values():
        buffer = io.BytesIO()
        torch.save(content, buffer)
        s3(moto).put_object(Bucket="weights", Key=f"{prefix}/{file_name}", Body=buffer.getvalue())
    return f"s3://weights/{prefix}"


def patches(n=2, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.usefixtures("creds")
def test_rewards_and_scores_load_learned_metrics_from_the_synced_cache(moto, tmp_path):
    networks = untrained_networks()
    uri = upload(moto, networks, "learned")
    cache = tmp_path / "weights"
    raw = smoke_raw() | {"storage": {"endpoint_url": moto[0], "weights_uri": uri, "weights_dir": str(cache)}}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "weights", "sync"], tmp_path)
    assert f"2 downloaded, 0 unchanged -> {cache}" in proc.stdout
    assert sorted(p.name for p in cache.iterdir()) == sorted(file for _, file, _ in networks.values())

    # The RL reward as the rl stage builds it: params -> storage.weights_dir -> pyiqa.
    RewardModel(kernels=8, hidden=16).save(Paths(tmp_path).reward_model)
    params = smoke_params(rl={"reward": {"learned": 1.0, "musiq": 0.1, "cnniqa": 1.0}}, storage=raw["storage"])
    reward = load_reward(params, Paths(tmp_path), torch.device("cpu"), differentiable=True)
    x = patches().requires_grad_(True)
    total = reward(x)
    assert total.shape == (2,) and torch.isfinite(total).all()
    total.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "reward feedback needs a gradient"

    # Each term is the architecture with the weights from the cache (fresh ones would differ).
    images01 = (patches() + 1) / 2
    for name, (network, _, _) in networks.items():
        scorer = next(t.scorer for t in reward.terms if t.name == name)
        with torch.no_grad():
            torch.testing.assert_close(scorer(patches()), network(images01).reshape(-1))

    # evaluate's nr_metrics get the same directory.
    split = PairedSplit(patches(seed=1), patches(), [{"task": "gaussian_noise"}] * 2)
    metrics = score_outputs({"lq": split.lq}, split, ["psnr"], ["piqe", "cnniqa"],
                            weights_dir=storage.pyiqa_cache_dir(params.storage))
    with torch.no_grad():
        expected = float(networks["cnniqa"][0]((split.lq + 1) / 2).mean())
    assert metrics["overall"]["lq"]["cnniqa"] == pytest.approx(expected, abs=1e-4)
    assert metrics["higher_is_better"] == {"psnr": True, "piqe": False, "cnniqa": True, "realism": False}


@pytest.mark.usefixtures("creds")
def test_without_weights_dir_sync_and_metrics_use_pyiqa_cache_under_torch_home(moto, tmp_path, monkeypatch):
    """pyiqa fixed its own cache directory when it was imported (before TORCH_HOME changes
    here); restorl passes the directory to pyiqa itself, so sync and metrics still agree."""
    networks = {"cnniqa": untrained_networks()["cnniqa"]}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = StorageConfig(endpoint_url=moto[0], weights_uri=upload(moto, networks, "default-cache"))

    storage.sync_weights(cfg)
    expected_file = tmp_path / "torch" / "hub" / "pyiqa" / networks["cnniqa"][1]
    assert storage.pyiqa_cache_dir(cfg) == expected_file.parent and expected_file.is_file()
    reward = build_reward({"cnniqa": 1.0}, torch.device("cpu"), weights_dir=storage.pyiqa_cache_dir(cfg))
    with torch.no_grad():
        torch.testing.assert_close(reward(patches()), networks["cnniqa"][0]((patches() + 1) / 2).reshape(-1))


def test_a_missing_weight_file_names_the_metric_and_the_file_and_downloads_nothing(tmp_path):
    RewardModel(kernels=8, hidden=16).save(Paths(tmp_path).reward_model)
    empty = tmp_path / "empty"
    params = smoke_params(rl={"reward": {"learned": 1.0, "musiq": 1.0}}, storage={"weights_dir": str(empty)})
    expected = empty / pyiqa_file_name(musiq_arch, "musiq")
    message = (f"pyiqa metric 'musiq' needs the weight file {expected}, which is missing; "
               "put it under storage.weights_uri and run `restorl weights sync`")
    with pytest.raises(iqa.MetricError, match=re.escape(message)):
        load_reward(params, Paths(tmp_path), torch.device("cpu"), differentiable=True)
    expected = empty / pyiqa_file_name(cnniqa_arch, "cnniqa")
    with pytest.raises(iqa.MetricError, match=re.escape(f"'cnniqa' needs the weight file {expected},")):
        iqa.score("cnniqa", patches(), weights_dir=empty)
