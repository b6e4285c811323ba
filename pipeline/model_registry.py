"""The MLflow model registry as restorl uses it: one registered restorer, two aliases.

Every trained model (sft, rl) becomes a new version with the alias `challenger`;
`restorl promote` decides whether it also becomes `champion`.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params

CHALLENGER = "challenger"
CHAMPION = "champion"


def register_restorer(params: Params, checkpoint: Path, tags: dict[str, str]) -> str:
    """Log the checkpoint as a pyfunc model in the active run and register a new version,
    tagged with `tags` and aliased `challenger`; returns the version."""
    from pipeline.models.pyfunc import log_restorer

    name = params.tracking.registered_model
    info = log_restorer(checkpoint, registered_model_name=name)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, version)
