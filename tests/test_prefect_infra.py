"""prefect.yaml and the Kubernetes GPU base job template, parsed (no cluster, no engine here).

The worker-side path (the server's copy of the pool, `from_template_and_values`) is tested in
test_prefect_server.py; this file needs no server.
"""

import inspect
import json

import pytest
import yaml
from prefect.utilities.templating import apply_values, find_placeholders

from flows.training import training_pipeline
from tests.conftest import REPO

TEMPLATE = REPO / "infra/k8s/gpu-base-job-template.json"


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def _container(job_configuration: dict) -> dict:
    [container] = job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return container


def test_every_placeholder_is_a_declared_variable():
    template = _template()
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert names <= declared, f"placeholders without a variable: {sorted(names - declared)}"
    assert template["variables"]["properties"]["gpu_count"]["type"] == "integer"


@pytest.mark.parametrize("gpus", [None, 0, 3])
def test_gpu_variable_reaches_the_container_limits(gpus):
    template = _template()
    values = _defaults(template) | ({} if gpus is None else {"gpu_count": gpus})
    job = apply_values(template["job_configuration"], values)
    resources = _container(job)["resources"]
    expected = template["variables"]["properties"]["gpu_count"]["default"] if gpus is None else gpus
    # A whole-string placeholder keeps the value's type: Kubernetes wants a number here.
    assert resources["limits"]["nvidia.com/gpu"] == expected
    assert resources["requests"]["nvidia.com/gpu"] == expected
    assert _container(job)["image"] == values["image"]


def test_prefect_yaml_deployments_are_complete():
    config = _prefect_yaml()
    flow_params = set(inspect.signature(training_pipeline.fn).parameters)
    deployments = {d["name"]: d for d in config["deployments"]}
    scheduled = [d for d in deployments.values() if d.get("schedules")]
    assert len(scheduled) >= 2, "a nightly and a weekly schedule are expected"
    pools = {d["work_pool"]["name"] for d in deployments.values()}
    assert pools == {"gpu", "local"}
    template_vars = set(_template()["variables"]["properties"])
    for name, d in deployments.items():
        assert d["entrypoint"] == "flows/training.py:training_pipeline", name
        assert set(d["parameters"]) <= flow_params, f"{name}: unknown flow parameters"
        assert d["concurrency_limit"]["limit"] == 1, name
        assert "restorl" in d["tags"], name
        if d["work_pool"]["name"] == "gpu":
            assert set(d["work_pool"]["job_variables"]) <= template_vars, name
            assert d["work_pool"]["job_variables"]["gpu_count"] >= 1, name
    # The flow validates its parameters; an override typo must not be scheduled for months.
    for d in scheduled:
        assert "overrides" not in d["parameters"] or isinstance(d["parameters"]["overrides"], dict)


def test_pull_steps_clone_at_a_ref_and_pull_dvc_inputs():
    steps = _prefect_yaml()["pull"]
    kinds = [next(iter(s)) for s in steps]
    assert kinds[0] == "prefect.deployments.steps.git_clone"
    clone = steps[0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] and clone["branch"]
    assert any("dvc pull" in s.get("prefect.deployments.steps.run_shell_script", {}).get("script", "")
               for s in steps)
    # The shell step runs inside the clone.
    assert kinds.index("prefect.deployments.steps.set_working_directory") < len(kinds) - 1


def test_credentials_come_from_a_secret_and_shm_is_a_memory_volume():
    """Job variables are readable with the deployment: credentials come from a Kubernetes Secret
    (envFrom), and /dev/shm is a memory-backed volume (the container default is 64 MiB)."""
    template = _template()
    values = _defaults(template) | {"credentials_secret": "team-s3", "shm_size": "2Gi"}
    job = apply_values(template["job_configuration"], values)
    container = _container(job)
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == "/dev/shm"
    [volume] = job["job_manifest"]["spec"]["template"]["spec"]["volumes"]
    assert volume == {"name": mount["name"], "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}
    env_help = template["variables"]["properties"]["env"]["description"]
    assert "credentials go in the Secret" in env_help and "AWS_SECRET_ACCESS_KEY" not in json.dumps(_defaults(template))
