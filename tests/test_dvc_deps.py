"""dvc.yaml's code deps cover every file of this repository that a stage's command runs.

A stage's command is `restorl <stage>`: pipeline/cli.py (its module-level imports and the
imports of `_run_stage`, which every stage command goes through) plus the stage module and,
transitively, every module of this repository they import — at module level or inside a
function (a lazy import runs too), but not under `if TYPE_CHECKING:`. A file missing from a
stage's deps is a change that `dvc repro` would not see: it would call a stale stage up to
date. Listing a folder covers every file in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("pipeline", "flows")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a module of this repository (None for anything else)."""
    if not name.startswith(PACKAGES):
        return None
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement in `tree` names (`from a import b` gives a and a.b)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def closure(modules: set[str], root: Path = REPO) -> set[Path]:
    """The files of `modules` and of everything they import within this repository, with the
    `__init__.py` of every package on the way (Python runs those too)."""
    seen: set[Path] = set()
    todo = [m for m in modules]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            package = ".".join(parts[:i]) if path.name == "__init__.py" else ".".join(parts[:i - 1])
            todo += imported_modules(ast.parse(path.read_text()), package)
    return seen


def cli_imports(root: Path = REPO) -> set[str]:
    """What `restorl <stage>` imports before the stage: cli.py's module-level imports and `_run_stage`'s."""
    tree = ast.parse((root / "pipeline" / "cli.py").read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= imported_modules(node, "pipeline")
        elif isinstance(node, ast.FunctionDef) and node.name == "_run_stage":
            found |= imported_modules(node, "pipeline")
    return found


def stage_code(stage: str, root: Path = REPO) -> set[Path]:
    return closure(cli_imports(root) | {f"pipeline.stages.{stage}"}, root) | {root / "pipeline" / "cli.py"}


def missing_deps(dvc_yaml: dict, root: Path = REPO) -> dict[str, list[str]]:
    """stage -> the repository files its command runs that its deps do not cover."""
    out = {}
    for stage, spec in dvc_yaml["stages"].items():
        deps = [Path(d if isinstance(d, str) else next(iter(d))) for d in spec.get("deps", [])]
        covered = [root / d for d in deps]
        missing = sorted(str(f.relative_to(root)) for f in stage_code(stage, root)
                         if not any(f == c or c in f.parents for c in covered))
        if missing:
            out[stage] = missing
    return out


def test_every_stage_lists_the_code_it_runs():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(dvc_yaml["stages"]) == {p.stem for p in (REPO / "pipeline" / "stages").glob("*.py")} - {"__init__"}
    missing = missing_deps(dvc_yaml)
    assert not missing, "dvc.yaml deps miss code their stage runs (add them): " + "; ".join(
        f"{stage}: {', '.join(files)}" for stage, files in missing.items())


def test_a_planted_omission_is_named():
    """Drop one file the rl stage runs (the sampler it trains) from its deps: the check names it."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = dvc_yaml["stages"]["rl"]["deps"]
    restorer = REPO / "pipeline" / "models" / "restorer.py"
    assert restorer in stage_code("rl")
    dvc_yaml["stages"]["rl"]["deps"] = [d for d in deps if not restorer.is_relative_to(REPO / d)]
    assert missing_deps(dvc_yaml) == {"rl": ["pipeline/models/restorer.py"]}


def test_closure_follows_lazy_imports_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import typer\n\ndef _run_stage():\n    from pipeline import config\n")
    (pkg / "config.py").write_text("")
    (pkg / "lazy.py").write_text("")
    (pkg / "typing_only.py").write_text("")
    (pkg / "stages" / "s.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import typing_only\n"
        "def run():\n    from pipeline.lazy import x\n")
    files = {str(p.relative_to(tmp_path)) for p in stage_code("s", tmp_path)}
    assert files == {"pipeline/__init__.py", "pipeline/cli.py", "pipeline/config.py", "pipeline/lazy.py",
                     "pipeline/stages/__init__.py", "pipeline/stages/s.py"}


@pytest.mark.parametrize("stage", ["prepare", "sft", "reward", "score", "rl", "evaluate", "promote"])
def test_stage_code_is_what_the_stage_needs(stage):
    """The closure is not everything: no stage runs another stage's module or the ablation."""
    files = {str(p.relative_to(REPO)) for p in stage_code(stage)}
    others = {f"pipeline/stages/{s}.py" for s in ("prepare", "sft", "reward", "score", "rl", "evaluate", "promote")}
    assert files & others == {f"pipeline/stages/{stage}.py"}
    assert not any(f.startswith(("pipeline/experiments", "flows/")) for f in files)
