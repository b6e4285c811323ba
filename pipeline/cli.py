"""`restorl` command line: one command per stage (what dvc.yaml calls), plus helpers."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import typer
import yaml

from pipeline.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RL fine-tuning of diffusion image restorers from IQA rewards.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
ProfileOpt = typer.Option(None, "--profile", help="a shipped profile (smoke, quality, faces, methods/<name>) or a .yaml file, merged over the params file")
# Bad params, data, URIs or missing artefacts: one message naming the culprit, exit status 2.
USER_ERRORS = (UserError, FileNotFoundError)


def _run_stage(name: str, params_file: Path, profile: Optional[str], many_processes: bool = False,
               report: Optional[Callable[[ModuleType, object], str]] = None,
               precheck: Optional[Callable[[object, str], None]] = None) -> None:
    """Load and validate the params, check the device and the tracking server, then import the
    stage module `pipeline.stages.<name>` and run it (it checks the part names it uses before
    any work). `precheck(params, source)`, if given, runs right after the params load: checks
    of the stage's that need no tracking store (`source` names the params file). `report(stage,
    result)`, if given, is printed after. The stage is imported last: its imports (torch,
    diffusers, MLflow) take seconds, and a bad setting or an unreachable server is reported
    before them. `many_processes`: the stage runs under a launcher
    (docs/distributed.md); any other stage started by one is refused."""
    import importlib

    from pipeline.config import NO_CUDA, ConfigError, load_params, params_source
    from pipeline.distributed import is_main, world_size
    from pipeline.storage import require_tracking_server
    from pipeline.tracking import configure, tracking_uri

    try:
        if many_processes:
            _relaunch_per_process(params_file, profile)
        if world_size() > 1 and not many_processes:
            raise UserError(f"{name} runs as one process (only sft, reward, rl and evaluate run on many); start it without "
                            f"torchrun/accelerate launch (WORLD_SIZE is {world_size()}; docs/distributed.md)")
        cfg = load_params(params_file, profile)
        if precheck:
            precheck(cfg, params_source(params_file, profile))
        # CUDA asked for and absent: torch alone tells, seconds before the stage's imports (it is
        # imported only then: source and prepare never need it).
        if cfg.runtime.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(NO_CUDA)
        # Before any work: an unreachable tracking server fails in seconds, naming its URI, and
        # the experiment must exist (it is created) and not be deleted. Under a launcher only
        # the main process talks to MLflow (pipeline/distributed.py).
        if is_main():
            require_tracking_server(tracking_uri(cfg))
            configure(cfg)
        stage = importlib.import_module(f"pipeline.stages.{name}")
        result = stage.run(cfg)
    except USER_ERRORS as err:
        _fail(err)
    if report:
        typer.echo(report(stage, result))


PROCESSES_ENV = "RESTORL_PROCESSES"


def _relaunch_per_process(params_file: Path, profile: Optional[str]) -> None:
    """With $RESTORL_PROCESSES (a number, or `gpus`: one per GPU this machine shows) above 1 and
    no launcher around, replace this process by torchrun starting that many copies of the same
    command (the GPU image sets `gpus`, so a job given N GPUs trains on all N). Only for the
    stages that run on many processes (sft, reward, rl, evaluate). The params are
    validated first, so a bad file fails here, once, with exit 2."""
    import os
    import sys

    from pipeline.config import load_params
    from pipeline.distributed import world_size

    wanted = os.environ.get(PROCESSES_ENV, "").strip()
    if not wanted or world_size() > 1:
        return
    if wanted == "gpus":
        import torch

        count = torch.cuda.device_count()
    elif wanted.isdigit() and int(wanted) > 0:
        count = int(wanted)
    else:
        raise UserError(f"${PROCESSES_ENV} is '{wanted}': give a number of processes or 'gpus' (one per GPU)")
    if count <= 1:
        return
    load_params(params_file, profile)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
            "-m", "pipeline.cli", *sys.argv[1:]]
    typer.echo(f"{PROCESSES_ENV}={wanted}: starting {count} processes: {' '.join(args[1:])}")
    sys.stdout.flush()
    os.execv(sys.executable, args)


def _fail(err: Exception) -> None:
    from pipeline.redaction import redact

    typer.secho(f"error: {redact(str(err))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from None


@app.command()
def source(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """List the source images prepare reads, with checksums (data/source.json)."""
    _run_stage("source", params, profile)


@app.command()
def prepare(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Cut HQ patches and make their degraded LQ twins (data/prepared)."""

    def part_names(cfg, source: str) -> None:  # named with the file, before MLflow and the stage's imports
        from pipeline.data import degradations

        degradations.check(cfg.prepare.degradations, source)

    _run_stage("prepare", params, profile, precheck=part_names)


@app.command()
def sft(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Train the diffusion restorer with the denoising loss (checkpoints/sft)."""
    _run_stage("sft", params, profile, many_processes=True)


@app.command()
def evaluate(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Restore the test split and score it (metrics/evaluate.json, plots/)."""
    _run_stage("evaluate", params, profile, many_processes=True)


@app.command()
def reward(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Train the learned no-reference reward model (checkpoints/reward, metrics/reward.json)."""
    _run_stage("reward", params, profile, many_processes=True)


@app.command()
def judge(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Train the held-out judge on images prepare never uses (checkpoints/judge, metrics/judge.json)."""
    _run_stage("judge", params, profile)


@app.command()
def score(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Score training samples' difficulty under the SFT model (data/difficulty.csv, plots/)."""
    _run_stage("score", params, profile)


@app.command()
def rl(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Difficulty-adaptive RL fine-tuning of the SFT model from the reward (checkpoints/rl)."""

    def part_names(cfg, source: str) -> None:  # named with the file, before MLflow and the stage's imports
        from pipeline.rl import parts

        parts.pick(cfg.rl, source)

    _run_stage("rl", params, profile, many_processes=True, precheck=part_names)


@app.command("params")
def show_params(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                output: Optional[Path] = typer.Option(None, "--output", "-o", help="write here instead of stdout")) -> None:
    """Print (or write) the validated params with a profile merged in (part names checked too).
    Without a params file here it starts from restorl's defaults: `restorl params -o
    params.yaml` writes a workspace's first params.yaml."""
    from pipeline.config import load_raw, params_source
    from pipeline.part_names import validate

    try:
        raw = load_raw(params, profile, defaults_if_missing=params == ParamsOpt.default)
        validate(raw, params_source(params, profile))
    except USER_ERRORS as err:
        _fail(err)
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
    from pipeline.commands import run_streamed, tool, tool_env
    from pipeline.config import load_raw
    from pipeline.evaluate_record import format_table, merge
    from pipeline.part_names import validate
    from pipeline.redaction import redact
    from pipeline.storage import require_tracking_server

    try:
        # Every stage's params and part names, before the first stage starts.
        cfg = validate(load_raw(params), str(params))
        require_tracking_server(tracking.tracking_uri(cfg))
    except USER_ERRORS as err:
        _fail(err)
    experiment_id = tracking.configure(cfg)
    with mlflow.start_run(run_name="pipeline", experiment_id=experiment_id,
                          tags={"restorl.stage": "pipeline", "restorl.git_commit": tracking.git_commit()}) as run:
        code = run_streamed([tool("dvc"), "repro", *(["--force"] if force else [])], env=tool_env(run.info.run_id))
        if code:
            mlflow.set_tag("restorl.failed", "true")
            raise typer.Exit(code)
    rl_file = Path("metrics/rl.json")
    if rl_file.exists():
        rl = json.loads(rl_file.read_text())
        typer.echo(f"\nRL (metrics/rl.json): {rl['rollouts']} rollouts, best epoch {rl['best_epoch']} of {rl['epochs']}; "
                   f"val reward gain {rl['val_reward_gain']:+.4g}, val PSNR drop {rl['val_psnr_drop']:.2f} dB "
                   f"(worst task {rl['worst_task']}: {rl['val_psnr_drop_worst_task']:.2f} dB)"
                   + (f", val judge drop {rl['val_judge_drop']:+.4g}" if "val_judge_drop" in rl else ""))
    metrics_file, detail_file = Path("metrics/evaluate.json"), Path("metrics/evaluate_detail.json")
    if metrics_file.exists() and detail_file.exists():
        typer.echo("\nTest split (headline: metrics/evaluate.json; every row, per task and the intervals: "
                   "metrics/evaluate_detail.json):")
        typer.echo(format_table(merge(json.loads(metrics_file.read_text()), json.loads(detail_file.read_text()))))
    typer.echo(f"\nMLflow: {redact(mlflow.get_tracking_uri())}  experiment '{cfg.tracking.experiment}', "
               f"pipeline run {run.info.run_id}")
    typer.echo(f"  browse: mlflow ui --backend-store-uri {redact(mlflow.get_tracking_uri())}")


@app.command()
def promote(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Promote the `challenger` model version to `champion` if it beats it on the test split."""
    # A refusal for lack of figures is an error (exit 2); a refused challenger is a decision (exit 0).
    _run_stage("promote", params, profile, report=lambda stage, decision: stage.format_decision(decision))


@app.command()
def ablate(methods: Optional[list[str]] = typer.Option(
               None, "--methods", help="RL methods to run, repeated or space separated; default all: adaptive "
               "uniform ppo ddpo coca lrpo rfsr flipped"),
           seeds: Optional[list[str]] = typer.Option(
               None, "--seeds", help="rl.seed values, repeated or space separated; default 0 1 2"),
           epochs: Optional[int] = typer.Option(None, "--epochs", min=1,
                                                help="rl.epochs of every run (the sample budget)"),
           out: Optional[Path] = typer.Option(None, "--out", help="also write the tables to this markdown file"),
           params: Path = ParamsOpt) -> None:
    """Run each RL method and seed as a DVC experiment (rl -> evaluate) and print the ablation tables."""
    from pipeline.commands import CommandError
    from pipeline.experiments import ablation

    try:
        code = ablation.run_ablation(ablation.chosen_methods(methods or []), ablation.chosen_seeds(seeds or []),
                                     epochs, params, out)
    except (*USER_ERRORS, CommandError) as err:
        _fail(err)
    if code:
        raise typer.Exit(code)


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="a restorl checkpoint, e.g. checkpoints/rl"),
           out: Path = typer.Argument(..., help="folder to write (replaced atomically)"),
           params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Merge a checkpoint's LoRA adapters into its base and write a plain diffusers folder."""
    from pipeline.config import load_params
    from pipeline.models.loading import export as export_folder
    from pipeline.paths import Paths

    try:
        cfg = load_params(params, profile)
        model = export_folder(checkpoint, out, cfg.storage, Paths(Path(".")).pretrained)
    except USER_ERRORS as err:
        _fail(err)
    merged = [a["name"] for a in model.adapters]
    typer.echo(f"export: {model.layout} model -> {out}" + (f" (adapters {', '.join(merged)} merged)" if merged else ""))


weights_app = typer.Typer(no_args_is_help=True, help="pyiqa weight cache (for workers without internet).")
app.add_typer(weights_app, name="weights")


@weights_app.command("sync")
def weights_sync(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                 uri: Optional[str] = typer.Option(None, help="s3://bucket/prefix; default storage.weights_uri"),
                 dest: Optional[Path] = typer.Option(None, help="cache dir; default storage.weights_dir or pyiqa's")) -> None:
    """Mirror pyiqa weights from an S3 prefix into the local cache (unchanged files skipped)."""
    from pipeline import storage
    from pipeline.config import load_params

    try:
        cfg = load_params(params, profile)
        done = storage.sync_weights(cfg.storage, uri, dest)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"weights: {len(done['downloaded'])} downloaded, {len(done['unchanged'])} unchanged "
               f"-> {dest or storage.pyiqa_cache_dir(cfg.storage)}")


@app.command()
def remote(url: str = typer.Argument(..., help="s3://bucket/prefix for DVC data and checkpoints"),
           endpoint: Optional[str] = typer.Option(None, help="S3 endpoint; stored in .dvc/config.local only")) -> None:
    """Make an S3 prefix the default DVC remote (credentials stay in the environment)."""
    from pipeline import storage

    try:
        storage.configure_dvc_remote(Path("."), url, endpoint)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"dvc remote 'store' -> {url}" + (f" (endpoint {endpoint} in .dvc/config.local)" if endpoint else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
