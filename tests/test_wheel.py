"""restorl as a wheel, the way the image installs it (not editable): its data files ship with it.

The wheel is built from this checkout and installed without dependencies into a fresh venv
that sees the test venv's packages (a path entry, so the editable install is not among them);
the commands run in an empty folder outside the repository.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _run(args, cwd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (what a clean clone has), so the build leaves no trace here."""
    files = _run(["git", "ls-files", "-z"], REPO).stdout.split("\0")
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return dest


def test_a_wheel_install_runs_a_profile_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    source = _tracked_copy(tmp_path / "source")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source], tmp_path)
    [wheel] = dist.glob("restorl-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    site = Path(_run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    (site / "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([venv / "bin/python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    installed = _run([venv / "bin/python", "-c", "import pipeline; print(pipeline.__file__)"], work).stdout
    assert installed.startswith(str(site)), installed  # the wheel's copy, not the checkout
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    # No params.yaml here: `restorl params` starts from the defaults and writes the first one.
    _run([venv / "bin/restorl", "params", "--profile", "smoke", "-o", "params.yaml"], work, env=env)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    assert raw["sft"]["steps"] == yaml.safe_load((REPO / "pipeline/profiles/smoke.yaml").read_text())["sft"]["steps"]
    _run([venv / "bin/restorl", "prepare"], work, env=env)
    manifest = json.loads((work / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["test"] == ["chelsea"] and len(manifest["samples"]) > 0
