"""Running `dvc`, `restorl` and `git` as subprocesses, with the environment they need.

The tools installed next to this interpreter come first on PATH, so a stage command that DVC
runs finds the same `restorl`; DVC's analytics are off; a pipeline run's MLflow run id reaches
the stages' runs through PARENT_RUN_ENV. No mlflow, prefect or torch here: the flows import
this module and stay free of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
# A stage's MLflow run is nested under the run whose id this variable holds (`restorl repro`).
PARENT_RUN_ENV = "RESTORL_PARENT_RUN_ID"


class CommandError(RuntimeError):
    """A command could not start or exited non-zero; the message names it and ends with its stderr."""


def tool(name: str) -> str:
    """The path of a tool installed next to this interpreter (`dvc`, `restorl`, `mlflow`)."""
    return str(BIN / name)


def tool_env(parent_run_id: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with BIN first on PATH, DVC analytics off, the parent MLflow
    run id (when given) and `extra` variables."""
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env | extra


def run_captured(args: Sequence[str], cwd: Path | str | None = None, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command to the end with its output captured (text); with `check`, a non-zero exit
    raises CommandError naming the command and quoting the end of its stderr."""
    env = tool_env() if env is None else env
    try:
        proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                              check=False)
    except OSError as err:
        raise CommandError(f"cannot start `{_shown(args)}`: {err}") from None
    if check and proc.returncode != 0:
        raise CommandError(f"`{_shown(args)}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def run_streamed(args: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
                 on_line: Callable[[str], object] | None = None) -> int:
    """Run a command to the end; its exit code. Its output goes to this process's terminal, or,
    with `on_line`, line by line (stdout and stderr together) to that function. A command that
    cannot start raises CommandError."""
    env = tool_env() if env is None else env
    try:
        if on_line is None:
            return subprocess.call(list(args), cwd=cwd, env=env)
        proc = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
    except OSError as err:
        raise CommandError(f"cannot start `{_shown(args)}`: {err}") from None
    with proc:
        for line in proc.stdout:
            on_line(line)
        return proc.wait()


def dvc(*args: str, cwd: Path | str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` (the one next to this interpreter), output captured."""
    return run_captured([tool("dvc"), *args], cwd, check)


def git(*args: str, cwd: Path | str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`git ARGS`, output captured."""
    return run_captured(["git", *args], cwd, check)


def _shown(args: Sequence[str]) -> str:
    """The command as a user would type it: the program's name, not its full path."""
    return " ".join([Path(args[0]).name, *args[1:]])
