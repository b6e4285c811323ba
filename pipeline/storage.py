"""S3 and tracking-server access: downloads, the pyiqa weight cache, the DVC remote, preflights.

Endpoints come from params (`storage.endpoint_url`) or $AWS_ENDPOINT_URL; credentials only from
the environment / AWS profile (boto3's own chain) or DVC's `.dvc/config.local` — never from
params, so they never reach MLflow. Every failure is a `StorageError` naming the URI and the
endpoint; downloads land in a temp path first and are renamed into place, so a failed
transfer leaves no partial files behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import StorageConfig
from pipeline.errors import UserError
from pipeline.redaction import redact, without_credentials

# Short timeouts and few retries: an unreachable endpoint should fail in seconds with a clear
# message, not after botocore's default minutes of back-off.
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                     "InvalidToken", "InvalidClientTokenId", "AuthFailure", "Forbidden", "403"}


class StorageError(UserError, RuntimeError):
    """S3 or the tracking server cannot be used; the message names the URI and endpoint."""


def endpoint_url(cfg: StorageConfig | None = None) -> str | None:
    return (cfg.endpoint_url if cfg else None) or os.environ.get("AWS_ENDPOINT_URL") or None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise StorageError(f"{uri}: not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def s3_client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    # A fresh session reads the credentials now; boto3's default session caches the first ones.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _where(endpoint: str | None) -> str:
    return f"S3 endpoint {redact(endpoint)}" if endpoint else "AWS S3 (no endpoint set)"


def storage_error(err: Exception, uri: str, endpoint: str | None) -> StorageError:
    """Translate a boto3/botocore failure into one line naming the URI and the endpoint."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = _where(endpoint)
    if isinstance(err, EndpointConnectionError) or "Could not connect" in str(err):
        return StorageError(f"{uri}: {where} is unreachable ({err})")
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials found for {where}; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in CREDENTIAL_ERRORS:
            key = os.environ.get("AWS_ACCESS_KEY_ID", "")
            # Name the key id by its first characters only: enough to spot the wrong one.
            shown = f" (AWS_ACCESS_KEY_ID {key[:4]}…)" if key else ""
            return StorageError(f"{uri}: credentials rejected by {where}{shown}: {code}; check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            return StorageError(f"{uri}: bucket or key not found at {where} ({code})")
        return StorageError(f"{uri}: {where} refused the request: {code} {err}")
    return StorageError(f"{uri}: {where} failed: {type(err).__name__}: {err}")


def list_objects(uri: str, endpoint: str | None) -> list[dict]:
    """Every object under the prefix: dicts with Key, Size, ETag."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(endpoint)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        return [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    except Exception as err:
        raise storage_error(err, uri, endpoint) from None


def download_prefix(uri: str, dest: Path, endpoint: str | None) -> list[Path]:
    """Copy every object under `uri` into `dest` (keys relative to the prefix); returns the files."""
    bucket, prefix = split_s3_uri(uri)
    objects = list_objects(uri, endpoint)
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix at {_where(endpoint)}")
    targets = [local_target(dest, obj["Key"], prefix, uri) for obj in objects]  # every key checked first
    client, files = s3_client(endpoint), []
    for obj, target in zip(objects, targets):
        _download(client, bucket, obj["Key"], target, uri, endpoint)
        files.append(target)
    return files


def local_target(dest: Path, key: str, prefix: str, uri: str) -> Path:
    """Where object `key` under `prefix` lands in `dest`; a key that would land outside `dest`
    (a `..` part, an absolute path) is refused: S3 keys are anyone's strings."""
    rel = key[len(prefix):].lstrip("/")
    if not rel or rel.startswith("/") or ".." in Path(rel).parts:
        raise StorageError(f"{uri}: refusing object key '{key}': it would be written outside {dest}")
    return Path(dest) / rel


def _download(client, bucket: str, key: str, target: Path, uri: str, endpoint: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.part-", dir=target.parent)
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)
        raise storage_error(err, f"s3://{bucket}/{key}", endpoint) from None
    os.replace(tmp, target)


def object_uri(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended as key parts: object_uri("s3://b/p", "sft", "state.pt")."""
    split_s3_uri(uri)
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def upload_object(path: Path, uri: str, endpoint: str | None) -> None:
    """Put the file at `uri` (s3://bucket/key). An S3 PUT is atomic: a reader sees the old
    object or the new one, never a part (multipart uploads appear only once completed)."""
    bucket, key = split_s3_uri(uri)
    try:
        s3_client(endpoint).upload_file(str(path), bucket, key)
    except Exception as err:
        raise storage_error(err, uri, endpoint) from None


def download_object(uri: str, target: Path, endpoint: str | None) -> bool:
    """Copy the object at `uri` to `target` (temp name, then renamed); False when there is no
    such key (a missing bucket is an error)."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    client = s3_client(endpoint)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
            try:
                client.head_bucket(Bucket=bucket)
            except Exception as bucket_err:
                raise storage_error(bucket_err, uri, endpoint) from None
            return False
        raise storage_error(err, uri, endpoint) from None
    except Exception as err:
        raise storage_error(err, uri, endpoint) from None
    _download(client, bucket, key, Path(target), uri, endpoint)
    return True


def delete_object(uri: str, endpoint: str | None) -> None:
    bucket, key = split_s3_uri(uri)
    try:
        s3_client(endpoint).delete_object(Bucket=bucket, Key=key)
    except Exception as err:
        raise storage_error(err, uri, endpoint) from None


def _same_file(path: Path, obj: dict) -> bool:
    """Size, and the MD5 where the ETag is one (single-part uploads)."""
    if not path.is_file() or path.stat().st_size != obj["Size"]:
        return False
    etag = obj.get("ETag", "").strip('"')
    if not etag or "-" in etag:
        return True
    return hashlib.md5(path.read_bytes()).hexdigest() == etag


def pyiqa_cache_dir(cfg: StorageConfig | None = None) -> Path:
    """The directory pyiqa's weight files are read from (pipeline/rewards/iqa.py passes it to
    pyiqa) and `restorl weights sync` writes to: `storage.weights_dir`, else pyiqa's own cache
    `<torch hub dir>/pyiqa` (~/.cache/torch/hub/pyiqa, or $TORCH_HOME/hub/pyiqa)."""
    if cfg is not None and cfg.weights_dir:
        return Path(cfg.weights_dir).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "pyiqa"


def sync_weights(cfg: StorageConfig, uri: str | None = None, dest: Path | None = None) -> dict[str, list[str]]:
    """Mirror pyiqa weight files from `storage.weights_uri` into the local cache (one-way).

    Files already present with the same size/MD5 are skipped; others are downloaded to a temp
    name and renamed, so a worker never sees a truncated weight file.
    """
    uri = uri or cfg.weights_uri
    if not uri:
        raise StorageError("storage.weights_uri is not set (an s3://bucket/prefix of pyiqa weights)")
    return mirror_prefix(uri, Path(dest) if dest else pyiqa_cache_dir(cfg), endpoint_url(cfg))


def mirror_prefix(uri: str, dest: Path, endpoint: str | None) -> dict[str, list[str]]:
    """Copy every object under `uri` into `dest` (keys relative to the prefix), skipping files
    already there with the same size/MD5; each download lands under a temp name and is renamed."""
    bucket, prefix = split_s3_uri(uri)
    objects = list_objects(uri, endpoint)
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix at {_where(endpoint)}")
    targets = [local_target(dest, obj["Key"], prefix, uri) for obj in objects]  # every key checked first
    client, done = s3_client(endpoint), {"downloaded": [], "unchanged": []}
    for obj, target in zip(objects, targets):
        rel = str(target.relative_to(dest))
        if _same_file(target, obj):
            done["unchanged"].append(rel)
            continue
        _download(client, bucket, obj["Key"], target, uri, endpoint)
        done["downloaded"].append(rel)
    return done


def require_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI, when an http(s) MLflow tracking server does not answer.

    MLflow's own client retries for minutes and then raises a long traceback.
    """
    if not uri.startswith(("http://", "https://")):
        return
    plain, credentials = without_credentials(uri)
    request = urllib.request.Request(f"{plain.rstrip('/')}/health")
    if credentials:  # as MLflow sends them: basic auth, never in the URL of a request
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        problem = redact(str(getattr(err, "reason", err)))
    raise StorageError(f"MLflow tracking server {redact(uri)} is unreachable ({problem}); check "
                       "MLFLOW_TRACKING_URI / tracking.uri")


def configure_dvc_remote(root: Path, url: str, endpoint: str | None = None, name: str = "store") -> None:
    """Make `url` (s3://bucket/prefix) the default DVC remote of the project at `root`.

    The URL goes to `.dvc/config` (committed); the endpoint to `.dvc/config.local` (not
    committed, machine-specific). Credentials stay in the environment (or are added by the user
    with `dvc remote modify --local`): never written by restorl.
    """
    from pipeline.commands import dvc

    split_s3_uri(url)

    def call(*args: str) -> None:
        proc = dvc(*args, cwd=root, check=False)
        if proc.returncode:
            raise StorageError(f"dvc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    call("remote", "add", "--default", "--force", name, url)
    if endpoint:
        call("remote", "modify", "--local", name, "endpointurl", endpoint)
