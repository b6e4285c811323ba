"""The layout's rules, checked on the source: stages are reached only through the CLI, the
schema knows no part, and the schema's defaults are params.yaml's."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.config import Params, flatten, load_params
from pipeline.stage_code import closure, imported_modules
from tests.conftest import REPO

CODE = [p for folder in ("pipeline", "flows", "bench") for p in (REPO / folder).rglob("*.py")]


def imports_of(path: Path) -> set[str]:
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    return imported_modules(ast.parse(path.read_text()), package)


def test_only_the_cli_imports_stages():
    """A stage is code DVC runs as a unit; a module that imported one would run stage code that
    dvc.yaml does not list for it (and stages would depend on each other)."""
    allowed = {REPO / "pipeline" / "cli.py"}
    offenders = sorted(str(p.relative_to(REPO)) for p in CODE if p not in allowed
                       and any(m == "pipeline.stages" or m.startswith("pipeline.stages.") for m in imports_of(p)))
    assert offenders == []


def test_the_schema_imports_no_part():
    """config.py is the lowest layer: validating params loads neither torch nor the RL parts, and
    no module it imports imports it back."""
    imported = closure({"pipeline.config"}, REPO)
    assert {str(p.relative_to(REPO)) for p in imported} == {
        "pipeline/__init__.py", "pipeline/config.py", "pipeline/errors.py"}


def test_schema_defaults_are_params_yaml():
    """One source of truth: a key left out of params.yaml (or a Params() built in code) means
    the same as the shipped file."""
    shipped = flatten(load_params(REPO / "params.yaml").model_dump(mode="json"))
    defaults = flatten(Params().model_dump(mode="json"))
    differ = {k: (defaults.get(k), shipped.get(k)) for k in set(shipped) | set(defaults)
              if defaults.get(k) != shipped.get(k)}
    assert differ == {}, f"schema default vs params.yaml: {differ}"


def test_rl_functions_fit_on_a_screen():
    """The RL stage reads as its phases; no function of it or of its loop grows past ~60 lines."""
    long = []
    for path in [REPO / "pipeline" / "stages" / "rl.py", *(REPO / "pipeline" / "rl").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name}")
    assert long == []
