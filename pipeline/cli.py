"""`restorl` command line: one command per stage (what dvc.yaml calls), plus helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
import yaml

from pipeline.config import ConfigError, load_params, load_raw, validate
from pipeline.data.sources import DataError
from pipeline.iqa import MetricError
from pipeline.rewards.scorers import RewardError
from pipeline.storage import StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RL fine-tuning of diffusion image restorers from IQA rewards.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
ProfileOpt = typer.Option(None, "--profile", help="profile in profiles/ merged over the params file")
USER_ERRORS = (ConfigError, DataError, MetricError, RewardError, FileNotFoundError, StorageError)


def _run_stage(stage: Callable, params_file: Path, profile: Optional[str], errors: tuple = ()) -> None:
    from pipeline.storage import require_tracking_server
    from pipeline.tracking import tracking_uri

    try:
        cfg = load_params(params_file, profile)
        # Before any work: an unreachable tracking server fails in seconds, naming its URI.
        require_tracking_server(tracking_uri(cfg))
        stage(cfg)
    except USER_ERRORS + errors as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def prepare(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Cut HQ patches and make their degraded LQ twins (data/prepared)."""
    from pipeline.stages import prepare as stage

    _run_stage(stage.run, params, profile)


@app.command()
def sft(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Train the diffusion restorer with the denoising loss (checkpoints/sft)."""
    from pipeline.stages import sft as stage

    _run_stage(stage.run, params, profile)


@app.command()
def evaluate(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Restore the test split and score it (metrics/evaluate.json, plots/)."""
    from pipeline.stages import evaluate as stage

    _run_stage(stage.run, params, profile)


@app.command()
def reward(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Train the learned no-reference reward model (checkpoints/reward, metrics/reward.json)."""
    from pipeline.stages import reward as stage

    _run_stage(stage.run, params, profile)


@app.command()
def score(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Score training samples' difficulty under the SFT model (data/difficulty.csv, plots/)."""
    from pipeline.stages import score as stage

    _run_stage(stage.run, params, profile)


@app.command()
def rl(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Difficulty-adaptive RL fine-tuning of the SFT model from the reward (checkpoints/rl)."""
    from pipeline.stages import rl as stage

    _run_stage(stage.run, params, profile)


@app.command("params")
def show_params(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                output: Optional[Path] = typer.Option(None, "--output", "-o", help="write here instead of stdout")) -> None:
    """Print (or write) the validated params with a profile merged in."""
    try:
        raw = load_raw(params, profile)
        validate(raw, str(params))
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    text = yaml.safe_dump(raw, sort_keys=False)
    if output:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


@app.command()
def repro(params: Path = ParamsOpt, force: bool = typer.Option(False, help="dvc repro --force")) -> None:
    """`dvc repro` with every stage's MLflow run nested under one pipeline run; prints results."""
    import mlflow

    from pipeline import tracking
    from pipeline.stages.evaluate import format_table

    from pipeline.storage import require_tracking_server

    try:
        cfg = load_params(params)
        require_tracking_server(tracking.tracking_uri(cfg))
    except (ConfigError, StorageError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    experiment_id = tracking.configure(cfg)
    with mlflow.start_run(run_name="pipeline", experiment_id=experiment_id,
                          tags={"restorl.stage": "pipeline", "restorl.git_commit": tracking.git_commit()}) as run:
        env = os.environ | {tracking.PARENT_RUN_ENV: run.info.run_id}
        # Stage commands must find the `restorl` next to this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        code = subprocess.call([str(Path(sys.executable).parent / "dvc"), "repro", *(["--force"] if force else [])],
                               env=env)
        if code:
            mlflow.set_tag("restorl.failed", "true")
            raise typer.Exit(code)
    rl_file = Path("metrics/rl.json")
    if rl_file.exists():
        rl = json.loads(rl_file.read_text())
        val = rl["val"]
        typer.echo(f"\nRL (metrics/rl.json): {rl['rollouts']} rollouts, best epoch {rl['best_epoch']} of {rl['epochs']}; "
                   f"val reward {val['rl']['reward']:.4g} (SFT {val['sft']['reward']:.4g}), "
                   f"val PSNR {val['rl']['psnr']:.2f} dB (SFT {val['sft']['psnr']:.2f})")
    metrics_file = Path("metrics/evaluate.json")
    if metrics_file.exists():
        typer.echo("\nTest split (metrics/evaluate.json):")
        typer.echo(format_table(json.loads(metrics_file.read_text())))
    typer.echo(f"\nMLflow: {mlflow.get_tracking_uri()}  experiment '{cfg.tracking.experiment}', "
               f"pipeline run {run.info.run_id}")
    typer.echo(f"  browse: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")


@app.command()
def promote(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Promote the `challenger` model version to `champion` if it beats it on the test split."""
    from pipeline import registry

    def stage(cfg):
        typer.echo(registry.format_decision(registry.run(cfg)))

    # A refusal for lack of figures is an error (exit 2); a refused challenger is a decision (exit 0).
    _run_stage(stage, params, profile, errors=(registry.PromotionError,))


weights_app = typer.Typer(no_args_is_help=True, help="pyiqa weight cache (for workers without internet).")
app.add_typer(weights_app, name="weights")


@weights_app.command("sync")
def weights_sync(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                 uri: Optional[str] = typer.Option(None, help="s3://bucket/prefix; default storage.weights_uri"),
                 dest: Optional[Path] = typer.Option(None, help="cache dir; default storage.weights_dir or pyiqa's")) -> None:
    """Mirror pyiqa weights from an S3 prefix into the local cache (unchanged files skipped)."""
    from pipeline import storage

    try:
        cfg = load_params(params, profile)
        done = storage.sync_weights(cfg.storage, uri, dest)
    except USER_ERRORS as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"weights: {len(done['downloaded'])} downloaded, {len(done['unchanged'])} unchanged "
               f"-> {dest or storage.pyiqa_cache_dir(cfg.storage)}")


@app.command()
def remote(url: str = typer.Argument(..., help="s3://bucket/prefix for DVC data and checkpoints"),
           endpoint: Optional[str] = typer.Option(None, help="S3 endpoint; stored in .dvc/config.local only")) -> None:
    """Make an S3 prefix the default DVC remote (credentials stay in the environment)."""
    from pipeline import storage

    try:
        storage.configure_dvc_remote(Path("."), url, endpoint)
    except StorageError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"dvc remote 'store' -> {url}" + (f" (endpoint {endpoint} in .dvc/config.local)" if endpoint else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
