"""No password in a URI reaches the terminal, the run records or an error message."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.redaction import redact, without_credentials
from tests.conftest import BIN, smoke_raw, tool_env, write_params
from tests.test_storage import free_port

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("uri,shown", [
    (f"postgresql://mlflow:{SECRET}@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    (f"https://alice:{SECRET}@mlflow.example.com", "https://alice:***@mlflow.example.com"),
    (f"s3://bucket/key?X-Amz-Signature={SECRET}&x=1", "s3://bucket/key?X-Amz-Signature=***&x=1"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_hides_passwords_and_tokens_only(uri, shown):
    assert redact(f"error at {uri}: refused") == f"error at {shown}: refused"


def test_credentials_leave_the_url_for_a_header():
    assert without_credentials(f"https://alice:{SECRET}@host:8443/x") == ("https://host:8443/x", ("alice", SECRET))
    assert without_credentials("http://host") == ("http://host", None)


def test_a_tracking_uri_with_a_password_is_named_without_it(tmp_path):
    """An unreachable https://user:pass@host tracking server: one line, exit 2, no password
    (it used to crash the preflight with the password in the traceback)."""
    write_params(tmp_path, smoke_raw())
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"
    for command in (["sft"], ["repro"]):
        proc = subprocess.run([str(BIN / "restorl"), *command], cwd=tmp_path, capture_output=True, text=True,
                              env=tool_env(tmp_path) | {"MLFLOW_TRACKING_URI": uri}, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert SECRET not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        assert "http://alice:***@127.0.0.1" in proc.stderr

