"""infra/compose.yaml and infra/Dockerfile, checked by parsing (no container engine here)."""

import re

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
SECRET_KEYS = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)
VAR = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _command(service: dict) -> str:
    cmd = service.get("command", [])
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_stack_has_every_service_with_its_image_and_port(compose):
    services = compose["services"]
    assert {"postgres", "s3", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["s3"]["image"].startswith("minio/minio:")
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
        assert services[name]["image"].startswith("${RESTORL_IMAGE")
    ports = {name: {p.split(":")[-1] for p in s.get("ports", [])} for name, s in services.items()}
    assert "5000" in ports["mlflow"] and "4200" in ports["prefect-server"] and "9000" in ports["s3"]
    assert "latest" not in services["s3"]["image"] and "latest" not in services["postgres"]["image"]


def test_mlflow_server_uses_postgres_and_s3_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    cmd = _command(mlflow)
    assert "--backend-store-uri postgresql://" in cmd and "@postgres:5432/mlflow" in cmd
    assert "--artifacts-destination s3://mlflow/" in cmd
    env = _env(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    buckets = _command(compose["services"]["s3-buckets"])
    assert all(f"stack/{b}" in buckets for b in ("mlflow", "dvc", "weights"))


def test_prefect_server_and_gpu_worker(compose):
    server, worker = compose["services"]["prefect-server"], compose["services"]["prefect-worker"]
    assert "prefect server start" in _command(server) and "--port 4200" in _command(server)
    assert _env(server)["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in _env(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "prefect worker start" in _command(worker)
    env = _env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["count"] >= 1
    # The Prefect database the server connects to is created at Postgres' first start.
    assert "CREATE DATABASE prefect" in compose["configs"]["create-prefect-db"]["content"]


def test_secrets_are_required_variables_documented_in_the_example(compose):
    text = (INFRA / "compose.yaml").read_text()
    example = (INFRA / "stack.env.example").read_text()
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if SECRET_KEYS.search(key):
                m = VAR.fullmatch(str(value))
                # A secret is a variable with no default (`:?` makes compose refuse to start).
                assert m and m.group(2).startswith(":?"), f"{name}.{key} must be ${{VAR:?...}}, got {value!r}"
    used = {m.group(1) for m in VAR.finditer(text)}
    assert used <= documented, f"undocumented variables: {sorted(used - documented)}"
    for line in example.splitlines():
        if SECRET_KEYS.search(line.split("=", 1)[0]) and "=" in line and not line.startswith("#"):
            assert line.split("=", 1)[1].startswith("change-me")


def test_dockerfile_cuda_runtime_project_installed_non_root():
    text = (INFRA / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 1 and froms[0].startswith("nvidia/cuda:") and "-runtime-" in froms[0]
    assert "pip install -c constraints.txt ." in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Nothing is copied or installed after switching to the unprivileged user.
    after = lines[lines.index(f"USER {users[-1]}") + 1:]
    assert not any(ln.startswith(("COPY", "ADD", "RUN")) for ln in after)
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert not SECRET_KEYS.search(" ".join(ln for ln in lines if ln.startswith(("ENV", "ARG"))).replace(
        "PREFECT_SERVER_ANALYTICS_ENABLED", ""))


def test_the_gpu_image_trains_with_one_process_per_gpu():
    """A Kubernetes job of gpu_count GPUs runs `restorl sft` (and rl, evaluate) on all of them:
    the image sets RESTORL_PROCESSES=gpus (pipeline/cli.py relaunches under torchrun)."""
    from pipeline.cli import PROCESSES_ENV

    env = [ln.split(None, 1)[1] for ln in (INFRA / "Dockerfile").read_text().splitlines() if ln.startswith("ENV ")]
    assert f"{PROCESSES_ENV}=gpus" in env


def test_the_cuda_base_matches_the_cuda_of_the_pinned_torch_wheels():
    """torch's wheels bring their CUDA runtime (nvidia-cuda-runtime in constraints.txt); the
    image's CUDA base must be the same major.minor, or the driver/runtime pairing is untested."""
    import re

    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)", (INFRA / "Dockerfile").read_text(), re.M)
    wheels = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", (REPO / "constraints.txt").read_text(), re.M)
    assert base and wheels, "Dockerfile FROM nvidia/cuda:X.Y… and constraints.txt nvidia-cuda-runtime==X.Y… expected"
    assert base.groups() == wheels.groups(), (f"Dockerfile CUDA {'.'.join(base.groups())} vs torch wheels' CUDA "
                                              f"{'.'.join(wheels.groups())} (constraints.txt)")


def test_compose_points_workers_to_the_kubernetes_template():
    # The GPU job template itself lives in infra/k8s/ (owned by the Prefect flow work).
    assert "infra/k8s/" in (INFRA / "compose.yaml").read_text()
    assert "infra/k8s/" in (INFRA / "Dockerfile").read_text()


def test_every_published_port_is_bound_to_localhost_by_default(compose):
    """The servers have no auth: nothing is published on all interfaces unless RESTORL_BIND says so."""
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("${RESTORL_BIND:-127.0.0.1}:") for p in published), published
