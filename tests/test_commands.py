"""pipeline.commands: the environment the tools run in, and running them (real subprocesses)."""

import os
import subprocess
import sys

import pytest

from pipeline.commands import (
    BIN,
    PARENT_RUN_ENV,
    CommandError,
    dvc,
    git,
    run_captured,
    run_streamed,
    tool,
    tool_env,
)
from tests.conftest import REPO

PRINT_ENV = "import os, sys; print(os.environ.get(sys.argv[1], '-'))"


def test_tool_env_puts_this_interpreters_tools_first():
    env = tool_env()
    assert env["PATH"].split(os.pathsep)[0] == str(BIN)
    assert env["DVC_NO_ANALYTICS"] == "1" and PARENT_RUN_ENV not in env
    env = tool_env("run123", MLFLOW_TRACKING_URI="sqlite:///x.db")
    assert env[PARENT_RUN_ENV] == "run123" and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert tool("dvc") == str(BIN / "dvc")


def test_commands_see_the_environment_and_run_in_cwd(tmp_path):
    proc = run_captured([sys.executable, "-c", PRINT_ENV, PARENT_RUN_ENV], env=tool_env("run123"))
    assert proc.stdout == "run123\n"
    # the default environment is tool_env(): a bare `dvc` is the one next to this interpreter
    proc = run_captured(["sh", "-c", "command -v dvc; pwd"], cwd=tmp_path)
    assert proc.stdout.split() == [tool("dvc"), str(tmp_path.resolve())]
    assert dvc("--version").stdout.strip()
    git("init", "-q", cwd=tmp_path)
    assert git("rev-parse", "--show-toplevel", cwd=tmp_path).stdout.strip() == str(tmp_path.resolve())


def test_a_failure_names_the_command_and_its_stderr(tmp_path):
    with pytest.raises(CommandError, match=r"`dvc status` failed \(\d+\): ERROR: .*not inside of a DVC repository"):
        dvc("status", cwd=tmp_path)  # not a DVC repository
    proc = dvc("status", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr
    with pytest.raises(CommandError, match=r"`sh -c echo oops >&2; exit 3` failed \(3\): oops"):
        run_captured(["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(CommandError, match="cannot start `no-such-tool`"):
        run_captured([str(tmp_path / "no-such-tool")], check=False)
    with pytest.raises(CommandError, match="cannot start `no-such-tool`"):
        run_streamed([str(tmp_path / "no-such-tool")])


def test_streamed_output_goes_line_by_line_and_the_exit_code_comes_back(tmp_path):
    lines = []
    code = run_streamed(["sh", "-c", "echo one; echo two >&2; pwd; exit 4"], cwd=tmp_path, on_line=lines.append)
    assert code == 4 and lines == ["one\n", "two\n", f"{tmp_path.resolve()}\n"]
    assert run_streamed(["sh", "-c", "exit 0"]) == 0


def test_the_module_keeps_mlflow_prefect_and_torch_out():
    code = "import sys, pipeline.commands; print(sorted({'mlflow', 'prefect', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tracking_nests_stage_runs_under_the_same_variable():
    from pipeline import tracking

    assert tracking.PARENT_RUN_ENV == PARENT_RUN_ENV == "RESTORL_PARENT_RUN_ID"
