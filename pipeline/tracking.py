"""MLflow: one run per stage, nested under a pipeline run when `restorl repro` started one.

Tracking URI: $MLFLOW_TRACKING_URI, else `tracking.uri`, else a SQLite store `mlflow.db` with
artifacts in `mlartifacts/` inside the workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.paths import Paths

PARENT_RUN_ENV = "RESTORL_PARENT_RUN_ID"
RUN_INFO_DIR = ".restorl/runs"


def tracking_uri(params: Params, root: Path = Path(".")) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def configure(params: Params, root: Path = Path(".")) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside it; a server decides for itself.
    location = (root / "mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit(root: Path = Path(".")) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: list[str], root: Path = Path(".")) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage and log the params sections it reads."""
    experiment_id = configure(params, root)
    tags = {"restorl.stage": stage, "restorl.git_commit": git_commit(root),
            "restorl.params_hash": params.section_hash(*sections)}
    with mlflow.start_run(run_name=stage, experiment_id=experiment_id, tags=tags,
                          parent_run_id=os.environ.get(PARENT_RUN_ENV) or None) as run:
        logged = flatten({s: getattr(params, s).model_dump(mode="json") for s in sections})
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        yield run
    info = root / RUN_INFO_DIR / f"{stage}.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id,
                                "tracking_uri": mlflow.get_tracking_uri()}))


CHALLENGER = "challenger"
CHAMPION = "champion"


def register_restorer(params: Params, checkpoint: Path, tags: dict[str, str]) -> str:
    """Log the checkpoint as a pyfunc model in the active run and register a new version.

    The newest trained model is the `challenger`; `restorl promote` decides on `champion`.
    """
    from pipeline.models.pyfunc import log_restorer

    info = log_restorer(checkpoint, registered_model_name=params.tracking.registered_model)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(params.tracking.registered_model, version, key, value)
    client.set_registered_model_alias(params.tracking.registered_model, CHALLENGER, version)
    return version
