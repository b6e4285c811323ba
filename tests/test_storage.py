"""S3 through a real `moto_server` with credential checking on: weight sync, s3:// prepare
sources, and the faults a user meets (closed port, wrong keys, missing bucket, dead MLflow).

The server fixtures here are shared with tests/test_storage_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import BenchmarkConfig, StorageConfig
from pipeline.data.sources import DataError
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, write_params

ALLOW_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s}s")


@pytest.fixture(scope="session", name="moto")
def moto_fixture(tmp_path_factory):
    """A moto S3 server that checks credentials; yields (endpoint, key_id, secret).

    INITIAL_NO_AUTH_ACTION_COUNT lets the first three calls (create the user, allow it
    everything, issue its key) through unauthenticated; every later request must be signed
    with that key, so wrong credentials fail as they would on real S3.
    """
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log, stderr=log)
    try:
        wait_for_port(port, proc, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="restorl")
        iam.put_user_policy(UserName="restorl", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="restorl")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def s3(moto):
    endpoint, key_id, secret = moto
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def make_bucket(moto, name: str) -> None:
    client = s3(moto)
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)


@pytest.fixture
def creds(moto, monkeypatch):
    """The moto user's credentials in the environment, as a worker would have them."""
    endpoint, key_id, secret = moto
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return endpoint


# ------------------------------------------------------------------------------- weights sync


def test_weights_sync_mirrors_the_prefix_and_skips_unchanged(moto, creds, tmp_path):
    make_bucket(moto, "weights")
    client = s3(moto)
    blobs = {"musiq_koniq.pth": os.urandom(3000), "sub/topiq.pth": os.urandom(1000)}
    for rel, data in blobs.items():
        client.put_object(Bucket="weights", Key=f"pyiqa/{rel}", Body=data)
    client.put_object(Bucket="weights", Key="other/ignored.pth", Body=b"x")
    cfg = StorageConfig(endpoint_url=creds, weights_uri="s3://weights/pyiqa", weights_dir=str(tmp_path / "cache"))

    first = storage.sync_weights(cfg)
    assert sorted(first["downloaded"]) == sorted(blobs) and first["unchanged"] == []
    for rel, data in blobs.items():
        assert (tmp_path / "cache" / rel).read_bytes() == data
    assert not (tmp_path / "cache" / "ignored.pth").exists()
    assert not list((tmp_path / "cache").rglob(".*part-*"))  # no temp files left

    # A local file damaged (same size, other bytes) and a remote one replaced: both re-fetched.
    (tmp_path / "cache" / "musiq_koniq.pth").write_bytes(os.urandom(3000))
    client.put_object(Bucket="weights", Key="pyiqa/sub/topiq.pth", Body=b"new weights")
    second = storage.sync_weights(cfg)
    assert sorted(second["downloaded"]) == sorted(blobs)
    assert (tmp_path / "cache" / "sub/topiq.pth").read_bytes() == b"new weights"
    assert storage.sync_weights(cfg) == {"downloaded": [], "unchanged": sorted(blobs)}


def test_weights_sync_cli(moto, creds, tmp_path):
    make_bucket(moto, "weights")
    s3(moto).put_object(Bucket="weights", Key="cli/a.pth", Body=b"abc")
    raw = smoke_raw() | {"storage": {"endpoint_url": creds, "weights_uri": "s3://weights/cli"}}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "weights", "sync", "--dest", str(tmp_path / "w")], tmp_path)
    assert "1 downloaded, 0 unchanged" in proc.stdout
    assert (tmp_path / "w" / "a.pth").read_bytes() == b"abc"


# --------------------------------------------------------------------------- s3:// prepare source


def _upload_images(moto, bucket: str, prefix: str, folder: Path) -> None:
    make_bucket(moto, bucket)
    for path in sorted(folder.rglob("*.png")):
        s3(moto).upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _image_folder(root: Path, names=("astronaut", "rocket", "coffee", "chelsea")) -> Path:
    import skimage.data

    root.mkdir(parents=True)
    for name in names:
        Image.fromarray(np.asarray(getattr(skimage.data, name)())[:96, :128]).save(root / f"{name}.png")
    return root


def test_prepare_from_s3_matches_the_same_images_from_a_local_folder(moto, creds, tmp_path):
    from pipeline.stages import prepare

    folder = _image_folder(tmp_path / "images")
    _upload_images(moto, "data", "hq", folder)
    results = {}
    for where, path in (("local", str(folder)), ("s3", "s3://data/hq")):
        params = smoke_params(prepare={"source": {"kind": "folder", "path": path}},
                              storage={"endpoint_url": creds})
        prepare.run(params, tmp_path / where)
        results[where] = json.loads((tmp_path / where / "data/prepared/manifest.json").read_text())["samples"]
    per_image = params.prepare.patches_per_image  # smoke split: 2 train images, 1 val, 1 test
    assert len(results["s3"]) == 2 * per_image["train"] + per_image["val"] + per_image["test"]
    assert [s["sha256_lq"] for s in results["s3"]] == [s["sha256_lq"] for s in results["local"]]


def test_a_benchmark_on_s3_is_the_same_as_the_local_folder(moto, creds, tmp_path):
    from pipeline.data.benchmarks import load_benchmark

    folder = _image_folder(tmp_path / "bench", names=("coins", "moon"))
    _upload_images(moto, "data", "bench", folder)
    params = smoke_params(storage={"endpoint_url": creds})
    loaded = {where: load_benchmark("b", BenchmarkConfig(path=path, patches_per_image=4), params.prepare, 0, creds)
              for where, path in (("local", str(folder)), ("s3", "s3://data/bench"))}
    assert torch.equal(loaded["s3"].lq, loaded["local"].lq) and loaded["s3"].tasks == loaded["local"].tasks


def test_prepare_s3_pairs_error_names_the_uri(moto, creds, tmp_path):
    from pipeline.stages import prepare

    folder = _image_folder(tmp_path / "pairs" / "gt")
    shutil.copytree(folder, tmp_path / "pairs" / "lq")
    (tmp_path / "pairs" / "lq" / "rocket.png").unlink()
    _upload_images(moto, "data", "pairs", tmp_path / "pairs")
    params = smoke_params(prepare={"source": {"kind": "pairs", "path": "s3://data/pairs"}},
                          storage={"endpoint_url": creds})
    with pytest.raises(DataError, match=r"s3://data/pairs/gt/rocket.png: has no counterpart in s3://data/pairs/lq"):
        prepare.run(params, tmp_path / "ws")
    assert not (tmp_path / "ws" / "data").exists()


# ---------------------------------------------------------------------------------------- faults


def test_unreachable_s3_endpoint_is_named_and_leaves_nothing(creds, tmp_path):
    from pipeline.stages import prepare

    dead = f"http://127.0.0.1:{free_port()}"  # a real closed port, nothing listens there
    params = smoke_params(prepare={"source": {"kind": "folder", "path": "s3://data/hq"}},
                          storage={"endpoint_url": dead})
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"s3://data/hq: S3 endpoint {dead} is unreachable"):
        prepare.run(params, tmp_path)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "data").exists()
    with pytest.raises(storage.StorageError, match=rf"S3 endpoint {dead} is unreachable"):
        storage.sync_weights(StorageConfig(endpoint_url=dead, weights_uri="s3://w/p", weights_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", ["key_id", "secret"])
def test_wrong_credentials_are_a_clear_error(moto, creds, monkeypatch, tmp_path, bad):
    make_bucket(moto, "weights")
    s3(moto).put_object(Bucket="weights", Key="creds/a.pth", Body=b"abc")
    if bad == "key_id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = StorageConfig(endpoint_url=creds, weights_uri="s3://weights/creds", weights_dir=str(tmp_path / "c"))
    expected = "InvalidAccessKeyId" if bad == "key_id" else "SignatureDoesNotMatch"
    with pytest.raises(storage.StorageError, match=rf"credentials rejected by S3 endpoint {creds}.*{expected}") as err:
        storage.sync_weights(cfg)
    assert "not-the-secret" not in str(err.value) and moto[2] not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_missing_bucket_is_named(creds, tmp_path):
    cfg = StorageConfig(endpoint_url=creds, weights_uri="s3://no-such-bucket/x", weights_dir=str(tmp_path))
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/x: bucket or key not found"):
        storage.sync_weights(cfg)


def test_unreachable_mlflow_server_is_named_before_any_work(tmp_path):
    write_params(tmp_path, smoke_raw())
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"MLFLOW_TRACKING_URI": dead}
    proc = subprocess.run([str(BIN / "restorl"), "prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | env, timeout=120)
    assert proc.returncode == 2
    assert f"error: MLflow tracking server {dead} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_dvc_remote_rejects_a_non_s3_url(tmp_path):
    # The happy path (config vs config.local, no keys) is checked in tests/test_storage_e2e.py.
    with pytest.raises(storage.StorageError, match="http://not-s3: not an s3://bucket/prefix URI"):
        storage.configure_dvc_remote(tmp_path, "http://not-s3")
    assert not (tmp_path / ".dvc").exists()


def test_an_object_key_with_dotdot_is_refused_before_anything_is_written(moto, creds, tmp_path):
    """S3 keys are arbitrary strings: `pyiqa/../../escape.pth` must not land outside the cache."""
    make_bucket(moto, "weights")
    client = s3(moto)
    client.put_object(Bucket="weights", Key="pyiqa/good.pth", Body=b"ok")
    client.put_object(Bucket="weights", Key="pyiqa/../../escape.pth", Body=b"evil")
    cache = tmp_path / "deep" / "cache"
    cfg = StorageConfig(endpoint_url=creds, weights_uri="s3://weights/pyiqa", weights_dir=str(cache))
    with pytest.raises(storage.StorageError, match=r"refusing object key 'pyiqa/\.\./\.\./escape\.pth'"):
        storage.sync_weights(cfg)
    with pytest.raises(storage.StorageError, match="refusing object key"):
        storage.download_prefix("s3://weights/pyiqa", tmp_path / "dl", creds)
    assert not list(tmp_path.rglob("escape.pth")) and not list(tmp_path.rglob("good.pth"))


# ------------------------------------------------------------------------------- resume state


def test_resume_state_on_s3_is_keyed_by_fingerprint_and_cleared(moto, creds, tmp_path):
    """storage.resume_uri: a state saved on one machine is fetched on another only by a run of
    the same fingerprint; a finished run deletes it; a missing bucket is an error naming it."""
    from pipeline import checkpoint

    make_bucket(moto, "resume")
    cfg = StorageConfig(endpoint_url=creds, resume_uri="s3://resume/team")
    layer = torch.nn.Linear(2, 2)
    remote = checkpoint.RemoteState.of(cfg, "sft", "fp-a")
    assert remote.uri == "s3://resume/team/sft/fp-a/state.pt"
    checkpoint.save_state(tmp_path / "pod1", fingerprint="fp-a", step=7, objects={"layer": layer},
                          generator=torch.Generator().manual_seed(3), stats={"loss": [0.5]}, remote=remote)

    other = checkpoint.RemoteState.of(cfg, "sft", "fp-b")  # other params, data or code
    fresh = torch.nn.Linear(2, 2)
    assert checkpoint.load_state(tmp_path / "pod2", fingerprint="fp-b", objects={"layer": fresh},
                                 generator=torch.Generator(), remote=other) is None
    assert not (tmp_path / "pod2").exists()
    assert checkpoint.load_state(tmp_path / "pod3", fingerprint="fp-a", objects={"layer": fresh},
                                 generator=torch.Generator(), remote=remote) == (7, {"loss": [0.5]})
    assert torch.equal(fresh.weight, layer.weight)

    checkpoint.clear_state(tmp_path / "pod3", remote)
    assert not s3(moto).list_objects_v2(Bucket="resume").get("Contents")
    gone = checkpoint.RemoteState.of(StorageConfig(endpoint_url=creds, resume_uri="s3://no-such-bucket/x"), "rl", "f")
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/x/rl/f/state\.pt: bucket or key not found"):
        checkpoint.load_state(tmp_path / "pod4", fingerprint="f", objects={}, generator=torch.Generator(), remote=gone)
