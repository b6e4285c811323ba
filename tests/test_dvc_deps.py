"""dvc.yaml's code deps cover every file of this repository that a stage's command runs
(pipeline/stage_code.py says which: cli.py's imports, the stage module and everything they
import, lazy imports included). A file missing from a stage's deps is a change that `dvc repro`
would not see: it would call a stale stage up to date. Listing a folder covers every file in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.stage_code import stage_files
from tests.conftest import REPO


def stage_code(stage: str, root: Path = REPO) -> set[Path]:
    return stage_files(stage, root)


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


@pytest.mark.parametrize("stage", ["source", "prepare", "sft", "reward", "judge", "score", "rl", "evaluate", "promote"])
def test_stage_code_is_what_the_stage_needs(stage):
    """The closure is not everything: no stage runs another stage's module or the ablation."""
    files = {str(p.relative_to(REPO)) for p in stage_code(stage)}
    others = {f"pipeline/stages/{s}.py" for s in ("source", "prepare", "sft", "reward", "judge", "score", "rl", "evaluate",
                                                  "promote")}
    assert files & others == {f"pipeline/stages/{stage}.py"}
    assert not any(f.startswith(("pipeline/experiments", "flows/")) for f in files)


def test_the_model_code_mlflow_runs_is_a_dep_of_the_stages_that_register_it():
    """MLflow runs pipeline/models/pyfunc_model.py by path (no import names it): a change to it
    must still re-run the stages that log a restorer with it."""
    from pipeline.models.pyfunc import MODEL_CODE
    from pipeline.stage_code import RUN_BY_PATH

    assert MODEL_CODE.resolve() == REPO / Path(*RUN_BY_PATH["pipeline.models.pyfunc"][0].split(".")).with_suffix(".py")
    for stage in ("sft", "rl"):
        assert MODEL_CODE.resolve() in stage_code(stage), stage
