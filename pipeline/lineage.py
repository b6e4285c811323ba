"""A flow run's result kept reachable: the workspace saved as a DVC experiment and pushed.

`dvc exp save` commits dvc.lock, params.yaml and the uncached metrics and plots to a git ref
(`refs/exps/...`) without moving HEAD; `dvc exp push` sends that ref to the git remote and the
outputs it names to the DVC remote. The MLflow runs of the stages that ran, and the model
versions they registered, are tagged with the reference, so `dvc exp pull` + `dvc exp apply`
of it (or `git fetch` + `dvc pull`) restores exactly the checkpoints a version was made from.
No mlflow at import time: the flow imports this module.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.commands import dvc, git
from pipeline.paths import Paths
from pipeline.redaction import redact, without_credentials

TAG = "restorl.lineage."
SEED_TAG = "restorl.fresh_seed"
GIT_REMOTE = "origin"


class LineageError(RuntimeError):
    """The run could not be saved or pushed; the message names the remote or the command."""


@dataclass(frozen=True)
class Lineage:
    """Where a run's result lives: experiment name, its git ref and commit, the git remote."""

    name: str
    ref: str
    commit: str
    git_remote: str  # the URL without credentials

    def tags(self) -> dict[str, str]:
        return {TAG + key: value for key, value in asdict(self).items()}


def ref_name(text: str) -> str:
    """`text` as a valid experiment (git ref) name: letters, digits, `.`, `_` and `-`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    name = re.sub(r"\.{2,}", ".", name)
    if not name:
        raise LineageError(f"cannot make an experiment name of {text!r}")
    return name[:100]


def git_remote_url(root: Path, remote: str = GIT_REMOTE) -> str:
    """The URL of git remote `remote` without user or password; LineageError when there is none."""
    proc = git("remote", "get-url", remote, cwd=root, check=False)
    if proc.returncode != 0:
        raise LineageError(f"lineage: {root} has no git remote '{remote}' to push the run to "
                           f"(`git remote add {remote} <url>`): {proc.stderr.strip()}")
    return redact(without_credentials(proc.stdout.strip())[0])


def uncached_outputs(root: Path) -> list[str]:
    """The `cache: false` outputs, metrics and plots of dvc.yaml that exist: git carries them."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    found = []
    for spec in stages.values():
        for entry in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            if isinstance(entry, dict):
                path, opts = next(iter(entry.items()))
                if (opts or {}).get("cache") is False and (root / path).exists():
                    found.append(path)
    return sorted(set(found))


def untracked_gitignores(root: Path) -> list[str]:
    """The .gitignore files DVC wrote for new outputs that git does not track yet."""
    others = git("ls-files", "--others", "--exclude-standard", cwd=root).stdout.splitlines()
    return [p for p in others if Path(p).name == ".gitignore"]


def save(root: Path, name: str, remote: str = GIT_REMOTE) -> Lineage:
    """`dvc exp save` the workspace as experiment `name` and `dvc exp push` it to `remote`
    (its git ref there, its outputs to the default DVC remote)."""
    url = git_remote_url(root, remote)
    if dvc("remote", "default", cwd=root, check=False).returncode != 0:
        raise LineageError(f"lineage: {root} has no default DVC remote to push the checkpoints to "
                           "(`dvc remote add -d <name> <url>`); a saved run without them restores nothing")
    included = [*uncached_outputs(root), *untracked_gitignores(root)]
    proc = dvc("exp", "save", "--force", "--name", name, *[f"--include-untracked={p}" for p in included],
               cwd=root, check=False)
    if proc.returncode != 0:
        raise LineageError(f"lineage: `dvc exp save --name {name}` failed in {root}: {_tail(proc)}")
    ref, commit = experiment_ref(root, name)
    proc = dvc("exp", "push", remote, name, cwd=root, check=False)
    if proc.returncode != 0:
        raise LineageError(f"lineage: `dvc exp push {remote} {name}` to git remote {url} (and the DVC "
                           f"remote) failed: {_tail(proc)}")
    return Lineage(name=name, ref=ref, commit=commit, git_remote=url)


def experiment_ref(root: Path, name: str) -> tuple[str, str]:
    """The git ref and commit of the local experiment `name`."""
    refs = git("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/", cwd=root).stdout.split("\n")
    found = [line.split() for line in refs if line.split() and line.split()[0].endswith("/" + name)]
    if len(found) != 1:
        raise LineageError(f"lineage: expected one experiment ref named {name} in {root}, found {len(found)}")
    return found[0][0], found[0][1]


def _tail(proc) -> str:
    return redact((proc.stderr.strip() or proc.stdout.strip())[-800:])


def tag_mlflow(root: Path, lineage: Lineage, stages: list[str], seed: dict[str, int] | None = None,
               tracking_uri: str | None = None) -> dict[str, list[str]]:
    """Tag the MLflow runs of `stages` (from .restorl/runs/<stage>.json) and the model versions
    those runs registered with the lineage, and a freshly drawn `seed` ({params key: value}) as
    a tag `restorl.fresh_seed` and a param of each run; returns the run ids and `name/version`s."""
    from mlflow.tracking import MlflowClient

    # The stages' order: $MLFLOW_TRACKING_URI, then tracking.uri, then the workspace's SQLite store.
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
                          or f"sqlite:///{(root / 'mlflow.db').resolve()}")
    tags = lineage.tags() | {SEED_TAG: f"{key}={value}" for key, value in (seed or {}).items()}
    runs = [json.loads(p.read_text())["run_id"] for s in stages if (p := Paths(root).run_info / f"{s}.json").exists()]
    versions = registered_versions(root, stages, client, runs)
    for run_id in runs:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        logged = client.get_run(run_id).data.params
        for key, value in (seed or {}).items():
            if key not in logged:  # a stage that reads the key logged it already (rl.seed)
                client.log_param(run_id, key, str(value))
    for model, version in versions:
        for key, value in tags.items():
            client.set_model_version_tag(model, version, key, value)
    return {"runs": runs, "versions": [f"{m}/{v}" for m, v in versions]}


def registered_versions(root: Path, stages: list[str], client, runs: list[str]) -> list[tuple[str, str]]:
    """The model versions the runs `runs` registered, and the one metrics/rl.json names when rl ran."""
    found = {(v.name, str(v.version)) for run_id in runs
             for v in client.search_model_versions(f"run_id='{run_id}'")}
    rl_metrics = root / "metrics" / "rl.json"
    if "rl" in stages and rl_metrics.exists():
        registered: dict[str, Any] = json.loads(rl_metrics.read_text()).get("registered") or {}
        if registered.get("model") and registered.get("version"):
            found.add((registered["model"], str(registered["version"])))
    return sorted(found)


def markdown(lineage: Lineage | None, tagged: dict[str, list[str]], reason: str = "") -> str:
    """The `restorl-lineage` artifact: the reference and how to restore its checkpoints."""
    if lineage is None:
        return f"# Lineage\n\n- not saved: {reason}\n"
    lines = ["# Lineage", "", f"- experiment: `{lineage.name}`", f"- git ref: `{lineage.ref}`",
             f"- commit: `{lineage.commit}`", f"- git remote: `{lineage.git_remote}`",
             f"- MLflow runs tagged: {', '.join(tagged.get('runs', [])) or 'none'}",
             f"- model versions tagged: {', '.join(tagged.get('versions', [])) or 'none'}", "",
             "Restore its checkpoints in a clone of the git remote:", "", "```bash",
             f"dvc exp pull {GIT_REMOTE} {lineage.name}", f"dvc exp apply {lineage.name}", "```"]
    return "\n".join(lines) + "\n"
