"""The pipeline as one Prefect flow: every dvc.yaml stage is a task running `dvc repro --single-item`.

DVC stays the owner of hashes, the lock file and skipping up-to-date work; the flow adds
validated parameters, retries of transient failures, `dvc push`, a markdown artifact per stage,
schedules (prefect.yaml) and, with `lineage`, the run saved as a DVC experiment on the git remote
(pipeline/lineage.py). The stage list comes from dvc.yaml, so new stages join the flow
without a change here; `promote` is special: it runs only when the flow is asked to promote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from pipeline import lineage as lineage_store
from pipeline.commands import CommandError, dvc, git, run_captured, run_streamed, tool
from pipeline.config import ConfigError, deep_merge, flatten, profile_overrides, read_yaml
from pipeline.part_names import validate
from pipeline.paths import Paths

PROMOTE = "promote"
# `restorl <stage>` exits with 2 on a user error (bad params or data): retrying cannot help.
USER_ERROR_EXIT = 2
# The first line of a params.yaml that the flow wrote; the file it was made from is kept aside.
PARAMS_MARKER = "# Written by the restorl flow"
PARAMS_BASE = ".restorl/params.base.yaml"
FLOW_LOCK = ".restorl/flow.lock"


class StageUserError(RuntimeError):
    """A stage failed for a reason a retry cannot fix (bad params, bad data, bad ref)."""


class StageTransientError(RuntimeError):
    """A stage failed for a reason that may pass (lock held, OS error, crash): retried."""


# ---------------------------------------------------------------------------------------------
# the flow


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    git_ref: str | None = None,
    push: bool = True,
    promote: bool = False,
    force: list[str] | None = None,
    workspace: str = ".",
    retries: int = 2,
    retry_delay_s: float = 30.0,
    fresh_seed: str | None = None,
    lineage: bool = False,
) -> list[dict[str, Any]]:
    """Run the dvc.yaml stages in order, then `restorl promote` if asked, then save the lineage.

    overrides: params sections deep-merged over params.yaml (and the profile); validated first.
    profile: a profile in pipeline/profiles/ merged over params.yaml.  git_ref: check this ref out first.
    push: `dvc push` each stage's outputs when a DVC remote is configured.
    force: stages to re-run even when DVC finds them up to date; ["*"] for all of them.
    retries / retry_delay_s: attempts after a transient failure; the delay doubles each time.
    fresh_seed: a params key (e.g. runtime.seed) set to a new seed drawn for this flow run; the
      changed param makes DVC re-run the stages that read it, and params.yaml records it.
    lineage: when the run changed dvc.lock, save the workspace as a DVC experiment, push it to the
      git remote `origin` (outputs to the DVC remote) and tag the MLflow runs and versions with it.
    """
    root = Path(workspace).resolve()
    with workspace_lock(root):
        if git_ref:
            checkout(root, git_ref)
        overrides, seed = seeded_overrides(overrides or {}, fresh_seed)
        raw = params_task(root, profile, overrides)
        stages = [s for s in stage_order(root / "dvc.yaml") if s != PROMOTE]
        forced = set(stages) if "*" in (force or []) else set(force or [])
        if missing := forced - set(stages) - {"*"}:
            # Schedules may name stages that a branch does not have yet (rl, score, ...).
            get_run_logger().warning("force: no stage %s in dvc.yaml; ignored", sorted(missing))
        push = push and remote_configured(root)
        lock_before = read_text(root / "dvc.lock")
        backoff = [retry_delay_s * 2**i for i in range(retries)]
        stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=backoff)
        # One stage after the other: two DVC commands in one workspace fail on DVC's lock.
        results = [stage_task(root, stage, push, stage in forced) for stage in stages]
        results.append(promote_task.with_options(retries=retries, retry_delay_seconds=backoff)(
            root, promote, push))
        if lineage:
            ran = [r["stage"] for r in results if r["ran"]]
            changed = read_text(root / "dvc.lock") != lock_before
            results.append(lineage_task(root, ran, changed, seed, (raw.get("tracking") or {}).get("uri")))
    return results


@task(name="params", retries=0, cache_policy=NO_CACHE)
def params_task(root: Path, profile: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate params.yaml + profile + overrides before any stage runs (ConfigError: no retry)."""
    raw = materialise_params(root, profile, overrides)
    get_run_logger().info("params.yaml validated%s%s", f", profile {profile}" if profile else "",
                          f", overrides {json.dumps(overrides)}" if overrides else "")
    return raw


def _retry_transient_only(task, task_run, state) -> bool:
    return not isinstance(state.data, (StageUserError, ConfigError))


@task(name="stage", task_run_name="{stage}", retry_condition_fn=_retry_transient_only,
      cache_policy=NO_CACHE)
def run_stage(root: Path, stage: str, push: bool, force: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`, `dvc push --run-cache <stage>`, and the stage's markdown artifact."""
    start = time.perf_counter()
    # With a remote, a stage whose inputs were trained before (by any earlier run that pushed its
    # run-cache) is restored from it (`--pull`) instead of re-trained.
    output = run_dvc(root, ["repro", "--single-item", *(["--force"] if force else []),
                            *(["--pull"] if push else []), stage], stage)
    ran = f"Running stage '{stage}'" in output
    if push:
        run_dvc(root, ["push", "--run-cache", stage], stage)
    result = {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - start, 2), "pushed": push}
    publish_artifact(root, stage, result)
    return result


@task(name="promote", retry_condition_fn=_retry_transient_only, cache_policy=NO_CACHE)
def promote_task(root: Path, wanted: bool, push: bool) -> dict[str, Any]:
    """`restorl promote` (through DVC when dvc.yaml has the stage), only when asked and available."""
    logger = get_run_logger()
    result = {"stage": PROMOTE, "ran": False, "seconds": 0.0, "pushed": False}
    if not wanted:
        logger.info("promote skipped: the flow was not asked to promote (promote=False)")
        return result | {"skipped": "not requested"}
    if not cli_has_command(root, PROMOTE):
        logger.warning("promote skipped: `restorl --help` lists no `promote` command")
        return result | {"skipped": "no restorl promote command"}
    start = time.perf_counter()
    if PROMOTE in stage_order(root / "dvc.yaml"):
        output = run_dvc(root, ["repro", "--single-item", PROMOTE], PROMOTE)
        result["ran"] = f"Running stage '{PROMOTE}'" in output
        if push:
            run_dvc(root, ["push", PROMOTE], PROMOTE)
            result["pushed"] = True
    else:
        run_logged([tool("restorl"), PROMOTE], root, PROMOTE)
        result["ran"] = True
    result["seconds"] = round(time.perf_counter() - start, 2)
    publish_artifact(root, PROMOTE, result)
    return result


@task(name="lineage", retries=0, cache_policy=NO_CACHE)
def lineage_task(root: Path, ran: list[str], changed: bool, seed: dict[str, int],
                 tracking_uri: str | None = None) -> dict[str, Any]:
    """When the run `changed` dvc.lock, save and push it as a DVC experiment and tag the MLflow
    runs of the stages that `ran` and their model versions with it (and the fresh `seed`,
    {params key: value}, when one was drawn)."""
    result: dict[str, Any] = {"stage": "lineage", "ran": changed, "pushed": False}
    if not changed:
        reason = "dvc.lock is unchanged: the result is the one an earlier run saved"
        _logger().info("lineage: nothing saved, %s", reason)
        create_markdown_artifact(lineage_store.markdown(None, {}, reason), key=artifact_key("lineage"))
        return result
    try:
        saved = lineage_store.save(root, lineage_store.ref_name(run_name()))
    except (lineage_store.LineageError, CommandError) as err:
        raise StageUserError(str(err)) from None
    tagged = lineage_store.tag_mlflow(root, saved, ran, seed, tracking_uri)
    _logger().info("lineage: saved %s (%s) to %s; tagged %s", saved.name, saved.commit, saved.git_remote, tagged)
    create_markdown_artifact(lineage_store.markdown(saved, tagged), key=artifact_key("lineage"),
                             description="restorl: where this run's result is kept")
    return result | {"pushed": True, "tagged": tagged, **saved.tags()}


def read_text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def run_name() -> str:
    """`<deployment or flow>-<UTC start>-<flow run name>`: unique per flow run, readable."""
    from prefect.runtime import deployment, flow_run

    start = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return f"{deployment.name or 'training-pipeline'}-{start:%Y%m%dT%H%M%SZ}-{flow_run.name or 'local'}"


def seeded_overrides(overrides: dict[str, Any], key: str | None) -> tuple[dict[str, Any], dict[str, int]]:
    """`overrides` with params key `key` (dotted, e.g. runtime.seed) set to a fresh seed, and
    {key: seed}; unchanged and {} without a key. The seed comes from the flow run's id."""
    if not key:
        return overrides, {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a mapping of params sections, got {overrides!r}")
    *sections, leaf = key.split(".")
    if not sections or leaf != "seed":
        raise ConfigError(f"fresh_seed: {key!r} is not a seed key of params.yaml like runtime.seed or rl.seed")
    if key in flatten(overrides):
        raise ConfigError(f"fresh_seed: {key} is also set in overrides; set it in one place")
    seed = fresh_seed_value()
    nested: dict[str, Any] = {leaf: seed}
    for section in reversed(sections):
        nested = {section: nested}
    return deep_merge(overrides, nested), {key: seed}


def fresh_seed_value() -> int:
    """A seed from the flow run's id (random outside a flow run), below 2**31."""
    from prefect.runtime import flow_run

    return uuid.UUID(flow_run.id).int % 2**31 if flow_run.id else secrets.randbelow(2**31)


# ---------------------------------------------------------------------------------------------
# stages and params


def stage_order(dvc_yaml: Path) -> list[str]:
    """The stages of dvc.yaml, each after the stages whose outputs it reads; else file order."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as err:
        raise StageUserError(f"{dvc_yaml}: cannot read the stages: {err}") from None
    outs = {name: [_path_of(o) for o in spec.get("outs", [])] for name, spec in stages.items()}
    needs: dict[str, set[str]] = {}
    for name, spec in stages.items():
        deps = [_path_of(d) for d in spec.get("deps", [])]
        needs[name] = {other for other, paths in outs.items() if other != name
                       and any(_within(d, p) or _within(p, d) for d in deps for p in paths)}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [s for s in stages if s not in order and needs[s] <= set(order)]
        if not ready:
            raise StageUserError(f"{dvc_yaml}: stages depend on each other in a cycle: "
                                 f"{sorted(set(stages) - set(order))}")
        order.append(ready[0])  # file order among the ready ones keeps the result stable
    return order


def _path_of(entry: Any) -> str:
    return os.path.normpath(next(iter(entry)) if isinstance(entry, dict) else str(entry))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def materialise_params(root: Path, profile: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the params a run will use and write them to params.yaml, where DVC and stages read them.

    The file the flow first found is kept in .restorl/params.base.yaml, so a later run with
    another profile or no overrides starts from it rather than from an earlier run's values.
    """
    path, base_copy = root / "params.yaml", root / PARAMS_BASE
    current = path.read_text() if path.exists() else ""
    written_by_flow = current.startswith(PARAMS_MARKER) and base_copy.exists()
    base_file = base_copy if written_by_flow else path
    raw = read_yaml(base_file)
    if profile:
        raw = deep_merge(raw, profile_overrides(profile))
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a mapping of params sections, got {overrides!r}")
    raw = deep_merge(raw, overrides)
    validate(raw, f"{path} (profile {profile}, flow overrides)")
    if profile or overrides:
        if not written_by_flow:
            base_copy.parent.mkdir(parents=True, exist_ok=True)
            base_copy.write_text(current)
        header = f"{PARAMS_MARKER} from {PARAMS_BASE} + profile {profile} + overrides {json.dumps(overrides)}\n"
        text = header + yaml.safe_dump(raw, sort_keys=False)
        if text != current:
            path.write_text(text)
    elif written_by_flow:
        path.write_text(base_copy.read_text())
    return raw


# ---------------------------------------------------------------------------------------------
# running commands


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (tests, scripts)
        return logging.getLogger("restorl.flow")


def run_logged(args: list[str], root: Path, stage: str) -> str:
    """Run a command in the workspace, streaming its output to the task log; classify a failure."""
    logger = _logger()
    logger.info("$ %s", " ".join(args))
    lines: list[str] = []

    def log_line(line: str) -> None:
        lines.append(line)
        logger.info(line.rstrip())

    try:
        code = run_streamed(args, cwd=root, on_line=log_line)
    except CommandError as err:  # could not start
        raise StageTransientError(f"stage {stage}: {err}") from None
    output = "".join(lines)
    if code == 0:
        return output
    # DVC reports a failing stage command as "... failed to run: <cmd>, exited with <code>".
    stage_code = re.search(r"exited with (-?\d+)", output)
    errors = [ln.strip() for ln in lines if ln.lstrip().lower().startswith(("error:", "error "))]
    detail = errors[0] if errors else (lines[-1].strip() if lines else "no output")
    if code == USER_ERROR_EXIT or (stage_code and int(stage_code.group(1)) == USER_ERROR_EXIT):
        raise StageUserError(f"stage {stage} failed (not retried): {detail}")
    raise StageTransientError(f"stage {stage}: `{' '.join(args[:3])}` exited with {code}: {detail}")


def run_dvc(root: Path, args: list[str], stage: str) -> str:
    return run_logged([tool("dvc"), *args], root, stage)


def remote_configured(root: Path) -> bool:
    proc = dvc("remote", "list", cwd=root, check=False)
    if proc.returncode != 0:
        _logger().warning("nothing pushed: `dvc remote list` failed: %s", proc.stderr.strip()[-500:])
        return False
    return bool(proc.stdout.strip())


def cli_has_command(root: Path, name: str) -> bool:
    proc = run_captured([tool("restorl"), "--help"], cwd=root, check=False)
    # typer lists each command as a row "│ name   help… │" in its Commands box.
    return any(re.match(rf"^\W*{re.escape(name)}\s", line) for line in proc.stdout.splitlines())


def checkout(root: Path, ref: str) -> None:
    """Check `ref` out (detached) unless HEAD is already there; a bad ref fails at once. A ref
    that starts with "-" would be read by git as an option (`--upload-pack=…` runs a command)."""
    if ref.startswith("-"):
        raise StageUserError(f"git ref '{ref}' starts with '-': refusing it (git would read it as an option)")
    target = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=root, check=False)
    if target.returncode != 0:
        git("fetch", "--quiet", "origin", "--", ref, cwd=root, check=False)
        target = git("rev-parse", "--verify", "--quiet", "FETCH_HEAD^{commit}", cwd=root, check=False)
        if target.returncode != 0:
            raise StageUserError(f"git ref '{ref}' not found in {root} (nor on its origin)")
    if git("rev-parse", "HEAD", cwd=root, check=False).stdout.strip() == target.stdout.strip():
        return
    if (root / PARAMS_BASE).exists() and (root / "params.yaml").read_text().startswith(PARAMS_MARKER):
        (root / "params.yaml").write_text((root / PARAMS_BASE).read_text())  # let git switch it
        (root / PARAMS_BASE).unlink()
    done = git("checkout", "--quiet", "--detach", target.stdout.strip(), cwd=root, check=False)
    if done.returncode != 0:
        raise StageUserError(f"cannot check out git ref '{ref}' in {root}: {done.stderr.strip()}")


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """One flow run at a time per workspace (two served deployments may share a checkout)."""
    path = root / FLOW_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _logger().info("waiting for another flow run in %s to finish", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------
# the markdown artifact


def artifact_key(stage: str) -> str:
    return "restorl-" + re.sub(r"[^a-z0-9-]+", "-", stage.lower())


def mlflow_run_link(info: dict[str, str]) -> str:
    """A browser link to the run: the tracking server itself, or `mlflow ui` for a local store."""
    uri = info.get("tracking_uri", "")
    base = os.environ.get("RESTORL_MLFLOW_UI_URL") or (uri if uri.startswith(("http://", "https://"))
                                                       else "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"


def stage_metrics(root: Path, stage: str) -> dict[str, Any]:
    """Numbers (not booleans) from the metrics files the stage declares in dvc.yaml, as
    `file:dotted.key`."""
    spec = ((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}).get(stage) or {}
    found: dict[str, Any] = {}
    for entry in spec.get("metrics", []):
        path = root / _path_of(entry)
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            found |= {f"{path.name}:{k}": v for k, v in flatten(data).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return found


def stage_markdown(root: Path, stage: str, result: dict[str, Any]) -> str:
    status = (f"ran in {result['seconds']} s" if result["ran"] else "up to date (skipped by DVC)")
    lines = [f"# Stage `{stage}`", "", f"- status: {status}",
             f"- pushed to the DVC remote: {'yes' if result['pushed'] else 'no'}"]
    info_file = Paths(root).run_info / f"{stage}.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        lines.append(f"- MLflow run: [{info['run_id']}]({mlflow_run_link(info)}) "
                     f"(tracking URI `{info['tracking_uri']}`)")
        if not info.get("tracking_uri", "").startswith("http"):
            lines += [f"  open with `mlflow ui --backend-store-uri {info['tracking_uri']}`"]
    else:
        lines += ["- MLflow run: none recorded"]
    metrics = stage_metrics(root, stage)
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def publish_artifact(root: Path, stage: str, result: dict[str, Any]) -> None:
    create_markdown_artifact(stage_markdown(root, stage, result), key=artifact_key(stage),
                             description=f"restorl stage {stage}: metrics and MLflow run")
