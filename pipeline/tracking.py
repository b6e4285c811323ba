"""MLflow: one run per stage, nested under a pipeline run when `restorl repro` started one.

Tracking URI: $MLFLOW_TRACKING_URI, else `tracking.uri`, else a SQLite store `mlflow.db` with
artifacts in `mlartifacts/` inside the workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import mlflow

from pipeline.commands import PARENT_RUN_ENV, CommandError, git
from pipeline.config import Params, flatten
from pipeline.errors import UserError
from pipeline.paths import Paths
from pipeline.redaction import redact


class TrackingError(UserError):
    """The MLflow store cannot take this run (e.g. its experiment is deleted)."""


def tracking_uri(params: Params, root: Path = Path(".")) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def configure(params: Params, root: Path = Path(".")) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment '{name}' (tracking.experiment) is deleted in {uri}; restore it "
                            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or "
                            "name another experiment")
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
        return git("rev-parse", "HEAD", cwd=root).stdout.strip()
    except CommandError:  # not a git checkout, or no git
        return "unknown"


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
    info = Paths(root).run_info / f"{stage}.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id,
                                "tracking_uri": redact(mlflow.get_tracking_uri())}))
