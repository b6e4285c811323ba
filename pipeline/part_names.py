"""Names in params.yaml that pick a part — a degradation and its parameters, the RL objective,
step credit, step weighting, difficulty weighting, regularizers — checked against the
registries that hold the parts (pipeline/data/degradations.py, pipeline/rl/parts.py).

The schema (pipeline/config.py) knows none of the parts. Each stage checks the names it uses
before it does any work (`prepare` the degradations, `rl` its parts), and `restorl <stage>`
checks them before it opens the tracking store or imports the stage; `restorl params`,
`restorl repro`, `restorl ablate` and the Prefect flow check all of them up front with
`validate`. A bad name is one `ConfigError` naming the file and the key.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigError, Params
from pipeline.config import validate as validate_schema


def check(params: Params, source: str, rl_parts: bool = True) -> Params:
    """`params` when every part it names exists; else a ConfigError listing each bad key.
    `rl_parts=False` leaves the RL parts unchecked (their registries import torch, which the
    stages before `rl` need not)."""
    from pipeline.data import degradations

    found = degradations.problems(params.prepare.degradations)
    if rl_parts:
        from pipeline.rl import parts

        found += parts.problems(params.rl)
    if found:
        raise ConfigError(f"{source}: invalid params: " + "; ".join(found))
    return params


def validate(raw: dict[str, Any], source: str) -> Params:
    """The schema, then the part names."""
    return check(validate_schema(raw, source), source)
