"""The MLflow model registry as restorl uses it: one registered restorer, two aliases.

Every trained model (sft, rl) becomes a new version with the alias `challenger`;
`restorl promote` decides whether it also becomes `champion`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params

CHALLENGER = "challenger"
CHAMPION = "champion"


def register_restorer(params: Params, checkpoint: Path, tags: dict[str, str],
                      pretrained_cache: Path = Path(".restorl/pretrained")) -> str:
    """Log the checkpoint as a pyfunc model in the active run and register a new version,
    tagged with `tags`, the layout and the base it was fine-tuned from, and aliased
    `challenger`; returns the version. A checkpoint of adapters is logged merged into its
    base (fetched into `pretrained_cache` when it is on S3): the registered model loads without it."""
    import tempfile

    from pipeline.models.loading import export, read_meta
    from pipeline.models.pyfunc import log_restorer

    name = params.tracking.registered_model
    meta = read_meta(checkpoint) or {}
    base = meta.get("base") or {}
    tags = tags | {"restorl.layout": meta.get("layout", "pixel"), "restorl.base_uri": base.get("uri", ""),
                   "restorl.base_hash": base.get("hash", ""),
                   "restorl.adapters": ",".join(a["name"] for a in meta.get("adapters", []))}
    with tempfile.TemporaryDirectory(prefix="restorl-merged-") as tmp:
        if meta.get("adapters"):
            export(checkpoint, Path(tmp) / "merged", params.storage, pretrained_cache)
            checkpoint = Path(tmp) / "merged"
        sampling = params.evaluate.sampling.model_dump() | {"seed": params.runtime.seed}
        tags |= {"restorl.sampling": json.dumps(sampling)}
        info = log_restorer(checkpoint, registered_model_name=name, sampling=sampling)
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
