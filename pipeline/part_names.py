"""Names in params.yaml that pick a part — a degradation and its parameters, the RL objective,
step credit, step weighting, difficulty weighting, regularizers — checked against the
registries that hold the parts (pipeline/data/degradations.py, pipeline/rl/parts.py).

The schema (pipeline/config.py) knows none of the parts. Each stage checks the names it uses
before it does any work (`prepare` the degradations, `rl` its parts); `restorl prepare` and
`restorl rl` check them before they open the tracking store or import the stage. `restorl
params`, `restorl repro`, `restorl ablate` and the Prefect flow check all of them up front
with `validate`. A bad name is one `ConfigError` naming the file and the key.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigError, Params
from pipeline.config import validate as validate_schema


def check(params: Params, source: str) -> Params:
    """`params` when every part it names exists; else a ConfigError listing each bad key."""
    from pipeline.data import degradations
    from pipeline.rl import parts

    found = degradations.problems(params.prepare.degradations) + parts.problems(params.rl)
    if found:
        raise ConfigError(f"{source}: invalid params: " + "; ".join(found))
    return params


def validate(raw: dict[str, Any], source: str) -> Params:
    """The schema, then the part names."""
    return check(validate_schema(raw, source), source)
