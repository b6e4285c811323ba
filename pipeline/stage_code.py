"""The files of this package that a stage's command runs: `restorl <stage>` is pipeline/cli.py
(its module-level imports, those of `_run_stage`, which every stage command goes through and
which imports the stage module by name, and those of the command function itself) plus the
stage module and, transitively, every module of the package they import — at module level or
inside a function (a lazy import runs too), but not under `if TYPE_CHECKING:`.

A module this package hands to another program to run by path, not by import, counts as
imported by the module that hands it over (`RUN_BY_PATH`).

Two things depend on it: tests/test_dvc_deps.py checks that dvc.yaml lists these files as each
stage's deps (so `dvc repro` re-runs a stage whose code changed), and the resume fingerprint of
sft and rl hashes them (so a re-run after a code change never resumes the old code's state).
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.checkpoint import file_hash

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds pipeline/
PACKAGES = ("pipeline", "flows")
# Module -> modules it has another program run by path: MLflow logs pipeline/models/pyfunc_model.py
# with every registered restorer (pipeline.models.pyfunc.MODEL_CODE) and runs it to load one.
RUN_BY_PATH = {"pipeline.models.pyfunc": ["pipeline.models.pyfunc_model"]}


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
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


def closure(modules: set[str], root: Path = PACKAGE_ROOT) -> set[Path]:
    """The files of `modules` and of everything they import within this repository (or have run
    by path: `RUN_BY_PATH`), with the `__init__.py` of every package on the way (Python runs
    those too)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            package = ".".join(parts[:i]) if path.name == "__init__.py" else ".".join(parts[:i - 1])
            todo += imported_modules(ast.parse(path.read_text()), package)
            todo += RUN_BY_PATH.get(".".join(parts[:i]), [])
    return seen


def cli_imports(stage: str, root: Path = PACKAGE_ROOT) -> set[str]:
    """What `restorl <stage>` imports besides the stage: cli.py's module-level imports, `_run_stage`'s
    and those of the stage's command function (cli.py's function named after the stage)."""
    tree = ast.parse((root / "pipeline" / "cli.py").read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= imported_modules(node, "pipeline")
        elif isinstance(node, ast.FunctionDef) and node.name in ("_run_stage", stage):
            found |= imported_modules(node, "pipeline")
    return found


def stage_files(stage: str, root: Path = PACKAGE_ROOT) -> set[Path]:
    """Every file of this repository that `restorl <stage>` runs."""
    return closure(cli_imports(stage, root) | {f"pipeline.stages.{stage}"}, root) | {root / "pipeline" / "cli.py"}


def code_hash(stage: str, root: Path = PACKAGE_ROOT) -> str:
    """Short hash of the contents of `stage_files` (in path order)."""
    return file_hash(*sorted(stage_files(stage, root)))
