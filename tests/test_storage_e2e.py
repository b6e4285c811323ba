"""One full `restorl repro` of a user's pretrained restorer against real local servers: moto S3
(credentials checked) and an MLflow server (SQLite backend, artifacts proxied to S3).

The model is the SD-upscaler layout with LoRA adapters on a base read from s3:// (the other
layouts run stage by stage in tests/test_layouts_e2e.py). DVC pushes to and pulls from S3, the
champion (the merged model) loads from the registry with no S3 credentials and restores what the
pulled checkpoint restores, the adapters export merged, and no secret reaches MLflow or the logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, REPO, smoke_params, smoke_raw, write_params
from tests.test_storage import (
    free_port,
    moto_fixture,  # noqa: F401  (registers the `moto` fixture here)
    wait_for_port,
)
from tests.tiny_models import save_sd_upscale

pytestmark = pytest.mark.e2e

# Stand-ins for secrets a worker has in its environment besides the S3 keys.
FAKE_SECRETS = {"PREFECT_API_KEY": "pnu_fake0secret0value0do0not0log", "HF_TOKEN": "hf_fake0token0value0xyz"}


@pytest.fixture(scope="module")
def buckets(moto):
    endpoint, key_id, secret = moto
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret)
    for name in ("mlflow", "dvc", "models"):
        client.create_bucket(Bucket=name)
    return client


@pytest.fixture(scope="module")
def mlflow_server(moto, buckets, tmp_path_factory):
    """`mlflow server` with an S3 artifact destination; only the server holds S3 credentials."""
    endpoint, key_id, secret = moto
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = os.environ | {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id,
                        "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                        # The server's job runner (a pool of huey processes) is not used here.
                        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    # Own session: the server forks workers, and the whole group is stopped at the end.
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", "s3://mlflow/artifacts", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=log, cwd=root,
                            start_new_session=True)
    try:
        wait_for_port(port, proc, "mlflow server", timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# MLflow 3.17 clients fetch S3-backed artifacts through presigned URLs when the server offers
# them; moto in credential-checking mode answers presigned (query-signed) requests with HTTP 500.
# Downloads streamed through the server work everywhere (and need no route to S3).
PROXIED_DOWNLOADS = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


def tool_env(moto, server: str) -> dict[str, str]:
    endpoint, key_id, secret = moto
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return env | FAKE_SECRETS | PROXIED_DOWNLOADS | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": server, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def run(args: list[str], root: Path, env: dict, logs: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    logs += [proc.stdout, proc.stderr]
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def file_hashes(root: Path, *dirs: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted((root / d).rglob("*")) if p.is_file()}


LORA = {"rank": 2, "alpha": 2.0}
BASE_URI = "s3://models/x2-upscaler"


@pytest.fixture(scope="module")
def smoke_on_s3(moto, buckets, mlflow_server, tmp_path_factory):
    """A git+DVC workspace whose `restorl repro` (smoke profile, LoRA on the SD-upscaler base at
    BASE_URI) ran against the servers; returns (root, env, logs)."""
    base = save_sd_upscale(tmp_path_factory.mktemp("base") / "x2-upscaler")
    for path in sorted(base.rglob("*")):
        if path.is_file():
            buckets.upload_file(str(path), "models", f"x2-upscaler/{path.relative_to(base)}")
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    raw = smoke_raw()
    raw["model"] |= {"pretrained": BASE_URI, "lora": LORA, "prompt": "a photo"}
    raw["storage"] = {"endpoint_url": moto[0]}
    write_params(root, raw)
    env, logs = tool_env(moto, mlflow_server), []
    run(["git", "init", "-q"], root, env, logs)
    run([str(BIN / "dvc"), "init", "-q"], root, env, logs)
    run([str(BIN / "restorl"), "remote", "s3://dvc/store", "--endpoint", moto[0]], root, env, logs)
    result = run([str(BIN / "restorl"), "repro"], root, env, logs)
    assert "Running stage 'promote'" in result.stdout
    return root, env, logs


def test_lora_on_an_s3_base_trains_adapters_and_registers_the_merged_model(smoke_on_s3, mlflow_server):
    root, _, _ = smoke_on_s3
    meta = json.loads((root / "checkpoints/rl/restorl.json").read_text())
    assert meta["layout"] == "sd_upscale" and meta["prompt"] == "a photo"
    assert meta["base"]["uri"] == BASE_URI
    # The checkpoint is the adapters alone; the base stays where it is.
    assert sorted(p.name for p in (root / "checkpoints/rl").iterdir()) == [
        "adapter_rl.safetensors", "adapter_sft.safetensors", "restorl.json"]
    assert json.loads((root / "metrics/evaluate.json").read_text())["overall"]["rl"]["psnr"] > 0
    champion = MlflowClient(mlflow_server).get_model_version_by_alias("restorer", "champion")
    assert champion.tags["restorl.layout"] == "sd_upscale" and champion.tags["restorl.adapters"] == "sft,rl"
    assert champion.tags["restorl.base_uri"] == BASE_URI and champion.tags["restorl.base_hash"] == meta["base"]["hash"]


def test_pipeline_on_s3_push_pull_and_champion(smoke_on_s3, moto, buckets, mlflow_server, monkeypatch):
    root, env, logs = smoke_on_s3
    # `restorl remote`: the URL is committed config, the endpoint machine-local, no keys anywhere.
    committed, local = (root / ".dvc/config").read_text(), (root / ".dvc/config.local").read_text()
    assert "url = s3://dvc/store" in committed and moto[0] not in committed
    assert f"endpointurl = {moto[0]}" in local
    assert "/config.local" in (root / ".dvc/.gitignore").read_text()
    promote = json.loads((root / "metrics/promote.json").read_text())
    assert promote["outcome"] == "promoted" and promote["champion"] is None  # first model

    # MLflow's artifacts live in the S3 bucket behind the server.
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("safetensors") for k in keys) and any(k.endswith("evaluate.json") for k in keys)

    # dvc push, lose the cache and the outputs, dvc pull: the same bytes come back.
    before = file_hashes(root, "data/prepared", "checkpoints/sft", "checkpoints/rl")
    assert len(before) > 50
    run([str(BIN / "dvc"), "push"], root, env, logs)
    assert buckets.list_objects_v2(Bucket="dvc", Prefix="store/")["KeyCount"] > 0
    for d in (".dvc/cache", "data/prepared", "checkpoints/sft", "checkpoints/rl"):
        shutil.rmtree(root / d)
    run([str(BIN / "dvc"), "pull"], root, env, logs)
    assert file_hashes(root, "data/prepared", "checkpoints/sft", "checkpoints/rl") == before

    # What the pulled checkpoint restores (its adapters merged into the base, read from S3 with
    # the keys this side still has), on evaluate's sampling and first batch's seed.
    from pipeline.config import StorageConfig
    from pipeline.models.loading import load_restorer
    from pipeline.seeding import batch_generator

    rng = np.random.default_rng(0)
    batch = rng.random((2, 32, 32, 3)).astype(np.float32)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    local = load_restorer(root / "checkpoints/rl", StorageConfig(endpoint_url=moto[0]),
                          cache=root / ".restorl/pretrained").eval()
    assert local.layout == "sd_upscale"
    cond = torch.from_numpy(batch).permute(0, 3, 1, 2) * 2 - 1
    sampling = smoke_params().evaluate.sampling  # the pyfunc's defaults: the evaluated sampling
    with torch.no_grad():
        expected = local.restore(cond, sampling.steps, sampling.eta, batch_generator(0, 0), samples=sampling.samples)

    # The champion (the rl stage's model, merged) loads through the server with no S3
    # credentials on this side, and restores as the pulled checkpoint does.
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for k, v in PROXIED_DOWNLOADS.items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/restorer@champion")
    restored = model.predict(batch)
    assert restored.shape == batch.shape and np.isfinite(restored).all()
    np.testing.assert_allclose(restored, ((expected + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-5)

    # Promote again: the challenger already is champion, nothing changes.
    again = run([str(BIN / "restorl"), "promote"], root, env, logs)
    assert "UNCHANGED" in again.stdout
    client = MlflowClient(mlflow_server)
    assert str(client.get_model_version_by_alias("restorer", "champion").version) == promote["challenger"]

    # The adapters export merged into a plain pipeline folder (the base read from S3 again).
    run([str(BIN / "restorl"), "export", "checkpoints/rl", "exported"], root, env, logs)
    assert load_restorer(root / "exported").layout == "sd_upscale"


def test_no_secret_reaches_mlflow_or_the_logs(smoke_on_s3, moto, mlflow_server, tmp_path, monkeypatch):
    root, env, logs = smoke_on_s3
    for k, v in PROXIED_DOWNLOADS.items():
        monkeypatch.setenv(k, v)
    secrets = [moto[1], moto[2], *FAKE_SECRETS.values()]
    client = MlflowClient(mlflow_server)
    texts = list(logs)
    experiment = client.get_experiment_by_name("restorl")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.data.tags["restorl.stage"] for r in runs} >= {"pipeline", "prepare", "sft", "evaluate", "promote"}
    for r in runs:
        texts += [json.dumps(r.data.params), json.dumps(r.data.tags), json.dumps(list(r.data.metrics))]
        dst = tmp_path / r.info.run_id
        dst.mkdir()
        if client.list_artifacts(r.info.run_id):
            mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(dst), tracking_uri=mlflow_server)
    for v in client.search_model_versions("name='restorer'"):
        texts.append(json.dumps(v.tags))
        mlflow.artifacts.download_artifacts(f"models:/restorer/{v.version}", dst_path=str(tmp_path / f"v{v.version}"),
                                            tracking_uri=mlflow_server)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files) and any(p.suffix == ".safetensors" for p in files)
    blobs = [p.read_bytes() for p in files] + [t.encode() for t in texts]
    blobs += [(root / ".dvc" / name).read_bytes() for name in ("config", "config.local")]
    blobs.append((root / "params.yaml").read_bytes())
    # Control: the scan sees what was logged (the evaluate metrics file, the pipeline's tags).
    assert any(b'"n_test": 7' in b for b in blobs) and any(b"restorl.params_hash" in b for b in blobs)
    for secret in secrets:
        leaks = [i for i, b in enumerate(blobs) if secret.encode() in b]
        assert not leaks, f"secret value found in {len(leaks)} logged item(s)"
