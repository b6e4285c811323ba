"""Every RL method on the same data, seeds and sample budget, as DVC experiments: the quality bench.

    restorl ablate [--methods "NAME ..."] [--seeds "0 1 2"] [--epochs N] [--out ablation.md]

Run in a workspace where the pipeline has run once (`restorl repro`) and whose dvc.yaml,
dvc.lock and params.yaml are committed to Git: DVC experiments are based on the Git HEAD
(uncommitted edits of tracked files are carried along). For each (method, seed) it runs

    dvc exp run --temp -n <method>-s<seed> -S rl.seed=<seed> -S rl.judge_guard=null [-S rl.epochs=N] \
        -S <method's keys> evaluate

The method's profile (pipeline/profiles/methods/<name>.yaml) is flattened to one `-S` per leaf key, as
`restorl params --profile` would deep-merge it; keys params.yaml lacks get hydra's `+`. Only rl
(and score, where the reward changes) re-run; prepare, sft and reward come from the cache.
`rl.judge_guard` is off in every run: the held-out judge is one of the bench's criteria and
must not have chosen the epochs it judges. `--temp` runs each experiment in its own directory,
so the workspace (params.yaml, outputs) stays as it was and no experiment inherits another's
settings. Promote is not run: the ablation
must not move the `champion` alias; the `challenger` alias, which each rl run moves, is put back.
Every stage logs its MLflow run into the workspace's store, under one parent run per
experiment (tag restorl.dvc_exp). Each run is in `dvc exp show` too.

Reading back: metrics/evaluate.json and metrics/rl.json from `dvc exp show --json`; the per-task
figures and every interval from metrics/evaluate_detail.json, and plots/rl_curves.csv, from the
experiment's Git commit (`git show <commit>:<path>`): both are `cache: false` outputs of
dvc.yaml, which DVC stages into the experiment commit with dvc.lock.

Rows: the seed method (params.yaml as it is: rl.objective refl, reward feedback through one
step's x0-hat, in the difficulty-adaptive RL/SFT mix), each method profile, the seed method with
the sign of every rl.reward term flipped (a run that optimises the reward's opposite), and the
SFT model and hack controls (one value each: they do not depend on rl.seed). Tables, on the test
split: (1) training reward, held-out judge, realism, PSNR, SSIM, GMSD, FSIM, mean ± std over
seeds, and whether RL improves (`verdict`, the bar of the quality bench); (2) each seed's paired
95 % interval of RL against SFT per metric, and the controls'; (3) per task, the difference from
SFT in PSNR, judge and realism with the intervals' verdicts. Then the per-epoch tables: uniform
vs difficulty-adaptive weighting, and sample efficiency (CoCA's claim: the rollouts' final
reward and the val reward per epoch against rollouts so far, coca vs ddpo).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_file
from pipeline.commands import dvc, git, run_streamed, tool, tool_env
from pipeline.config import PROFILES_DIR, Params, flatten, load_raw, read_yaml
from pipeline.errors import UserError
from pipeline.evaluate_record import merge
from pipeline.evaluate_record import verdict as interval_verdict
from pipeline.part_names import validate

METHODS_DIR = PROFILES_DIR / "methods"
SEED_METHOD, FLIPPED = "adaptive", "flipped"
METHODS = (SEED_METHOD, "uniform", "ppo", "ddpo", "coca", "lrpo", "rfsr", FLIPPED)
LABELS = {SEED_METHOD: "seed: params.yaml (ReFL, adaptive mix)", "uniform": "seed, uniform weighting",
          "ppo": "seed, PPO objective",
          "ddpo": "DDPO", "coca": "CoCA (DDPO + CoCA credit)", "lrpo": "LRPO", "rfsr": "RFSR (reward feedback)",
          FLIPPED: "seed, sign-flipped reward"}
DEFAULT_SEEDS = (0, 1, 2)
# DVC's default params file: `-S key=value` without a file prefix changes it.
DVC_PARAMS_FILE = "params.yaml"
DETAIL_FILE = "metrics/evaluate_detail.json"
REALISM = "realism"  # pipeline.scoring.REALISM (not imported here: that module loads torch and the models)
# (evaluate metric, column name, format); the arrow comes from evaluate's `higher_is_better`
TEST_METRICS = (("reward", "reward", ".4f"), ("judge", "judge", ".3f"), (REALISM, "realism", ".3f"),
                ("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".4f"), ("gmsd", "GMSD", ".4f"), ("fsim", "FSIM", ".4f"))
DIFF_FORMATS = {"reward": ".3f", "judge": ".3f", REALISM: ".3f", "psnr": ".2f", "ssim": ".4f", "gmsd": ".4f",
                "fsim": ".4f"}
TASK_METRICS = (("psnr", "PSNR"), ("judge", "judge"), (REALISM, "realism"))
# The bar of "RL improves" (`verdict`): gains on these judges RL never trained on, and the PSNR it may lose.
BAR_JUDGES = ("judge", REALISM)
PSNR_LOSS_OVERALL = 0.1  # dB, test PSNR below SFT's, mean over seeds
PSNR_LOSS_TASK = 0.3     # dB, on any one task
LOG_DIR = Path(".restorl/ablation")


class AblationError(UserError, RuntimeError):
    """The workspace cannot run the ablation; the message says what to do."""


@dataclass
class Run:
    """One finished experiment, read back from `dvc exp show --json` and its Git commit."""

    method: str
    seed: int
    name: str
    rl: dict            # metrics/rl.json
    evaluate: dict      # metrics/evaluate.json and evaluate_detail.json merged: every row, per task, the intervals
    images_per_epoch: int
    group_size: int
    curves: list[dict]  # plots/rl_curves.csv rows


def chosen_methods(values: list[str]) -> list[str]:
    """The methods of `--methods` (repeated, or several in one value, space separated); all for none."""
    names = list(dict.fromkeys(name for value in values for name in value.split()))
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise AblationError(f"--methods: unknown method {', '.join(map(repr, unknown))}; "
                            f"the methods are {' '.join(METHODS)}")
    return names or list(METHODS)


def chosen_seeds(values: list[str]) -> list[int]:
    """The rl.seed values of `--seeds` (repeated, or several in one value, space separated)."""
    seeds = []
    for word in (word for value in values for word in value.split()):
        if not re.fullmatch(r"\d+", word):
            raise AblationError(f"--seeds: {word!r} is not a seed (a whole number >= 0)")
        seeds.append(int(word))
    return list(dict.fromkeys(seeds)) or list(DEFAULT_SEEDS)


def run_ablation(methods: list[str], seeds: list[int], epochs: int | None = None,
                 params_file: Path = Path("params.yaml"), out: Path | None = None) -> int:
    """Run every (method, seed) experiment, print the tables (and write them to `out`).

    0 when every experiment finished, 1 when some (or all) failed; a workspace that cannot run
    the ablation raises AblationError, bad params ConfigError, a failing git/dvc CommandError."""
    params_file = Path(os.path.relpath(params_file))
    params_before = check_workspace(params_file)
    raw = load_raw(params_file)
    params = validate(raw, str(params_file))
    runs_spec = [(m, s, experiment_name(m, s), overrides(m, s, raw, epochs)) for m in methods for s in seeds]
    failed = run_experiments(runs_spec, params, params_file)
    if params_file.read_bytes() != params_before:
        params_file.write_bytes(params_before)
        print(f"ablation: {params_file} had changed during the runs; restored", file=sys.stderr)
    runs = read_runs([(m, s, n) for m, s, n, _ in runs_spec if n not in failed], params_file)
    if not runs:
        print("error: no experiment finished", file=sys.stderr)
        return 1
    text = report(runs)
    print(text)
    if out:
        with atomic_file(out) as tmp:
            tmp.write_text(text + "\n")
        print(f"\nwritten to {out}")
    if failed:
        print(f"\nfailed: {', '.join(failed)} (logs in {LOG_DIR}/)", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# the experiments


def check_workspace(params_file: Path = Path("params.yaml")) -> bytes:
    """Fail early, saying what to do, unless the pipeline ran here and is committed; the params file's bytes."""
    if not Path("dvc.yaml").exists() or not params_file.exists():
        raise AblationError(f"no dvc.yaml/{params_file} in {Path.cwd()}: run this in a restorl workspace")
    if git("rev-parse", "--verify", "-q", "HEAD", check=False).returncode != 0:
        raise AblationError("DVC experiments need a Git commit to start from: run `restorl repro` first, "
                            "then `git add -A && git commit -m baseline`")
    if not Path("dvc.lock").exists() or not Path("metrics/evaluate.json").exists():
        raise AblationError("the pipeline has not run in this workspace: run `restorl repro` first")
    untracked = [f for f in ("dvc.yaml", "dvc.lock", params_file.as_posix())
                 if git("ls-files", "--error-unmatch", f, check=False).returncode != 0]
    if untracked:
        raise AblationError(f"{', '.join(untracked)} not in Git; each experiment starts from HEAD plus edits of "
                            f"tracked files: `git add {' '.join(untracked)} && git commit -m baseline` first")
    validate(load_raw(params_file), str(params_file))
    stale = stale_stages(dvc("status", "--json", "--with-deps", "score").stdout)
    if stale:
        raise AblationError(f"{', '.join(stale)} not up to date with this workspace (`dvc status score`): "
                            "run `restorl repro` first")
    return params_file.read_bytes()


def stale_stages(status_json: str) -> list[str]:
    """The stages `dvc status --json` reports as changed, less those only "always changed" (the
    `source` stage lists the image source on every run; prepare re-runs only if the list differs)."""
    status = json.loads(status_json or "{}")
    return sorted(stage for stage, changes in status.items() if changes != ["always changed"])


def experiment_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def method_override(method: str, raw: dict) -> dict:
    """The params a method changes, as a partial params.yaml (a profile)."""
    if method == SEED_METHOD:
        return {}
    if method == FLIPPED:
        return {"rl": {"reward": {name: -weight for name, weight in raw["rl"]["reward"].items()}}}
    path = METHODS_DIR / f"{method}.yaml"
    if not path.exists():
        raise AblationError(f"no method profile {path}")
    return read_yaml(path)


def overrides(method: str, seed: int, raw: dict, epochs: int | None) -> list[str]:
    """`-S` values of one run: the method's keys, rl.seed, the budget, and no judge guard: the
    held-out judge is one of the bench's two criteria, so it must not have chosen (vetoed) the
    epoch it then judges; with it, a sign-flipped run would mostly ship SFT and look harmless."""
    changes = method_override(method, raw)
    changes.setdefault("rl", {})["seed"] = seed
    changes["rl"]["judge_guard"] = None
    if epochs is not None:
        changes["rl"]["epochs"] = epochs
    return set_params(changes, raw)


def set_params(override: dict, base: dict) -> list[str]:
    """`override` (a partial params.yaml) as `dvc exp run -S` values, one per leaf key.

    Leaf-wise, so the result is the same deep merge as a profile; a key `base` lacks gets `+`
    (hydra's append; DVC refuses a plain override of a missing key)."""
    out = []
    for key, value in flatten(override).items():
        out.append(f"{'' if has_key(base, key) else '+'}{key}={hydra_value(value)}")
    return out


def has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def hydra_value(value: Any) -> str:
    """A YAML value in hydra's override grammar (what `-S key=value` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in ("true", "false", "null", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise AblationError(f"cannot pass {value!r} as a -S value")


def run_experiments(specs: list[tuple[str, int, str, list[str]]], params: Params,
                    params_file: Path = Path(DVC_PARAMS_FILE)) -> list[str]:
    """Run each experiment in turn (rl -> evaluate); names of the failed ones."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.model_registry import CHALLENGER, alias_version, set_alias

    # --temp runs elsewhere: point every stage at this workspace's MLflow store.
    uri = tracking.tracking_uri(params)
    experiment_id = tracking.configure(params)
    client, model = MlflowClient(), params.tracking.registered_model
    challenger = alias_version(client, model, CHALLENGER)
    file_prefix = "" if params_file.as_posix() == DVC_PARAMS_FILE else f"{params_file.as_posix()}:"
    existing = set(dvc("exp", "list", "--name-only").stdout.split())
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        for i, (method, seed, name, sets) in enumerate(specs, 1):
            if name in existing:
                dvc("exp", "remove", name)
                print(f"ablation: replacing the earlier experiment {name}", file=sys.stderr)
            cmd = [tool("dvc"), "exp", "run", "--temp", "-n", name,
                   *[a for s in sets for a in ("-S", file_prefix + s)], "evaluate"]
            print(f"[{i}/{len(specs)}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            with mlflow.start_run(run_name=name, experiment_id=experiment_id,
                                  tags={"restorl.stage": "ablation", "restorl.dvc_exp": name,
                                        "restorl.method": method, "restorl.rl_seed": str(seed)}) as parent:
                log = LOG_DIR / f"{name}.log"
                with open(log, "w") as f:
                    code = run_streamed(cmd, env=tool_env(parent.info.run_id, MLFLOW_TRACKING_URI=uri),
                                        on_line=f.write)
                if code:
                    mlflow.set_tag("restorl.failed", "true")
            took = time.perf_counter() - t0
            if code:
                failed.append(name)
                tail = log.read_text().splitlines()[-15:]
                print(f"    FAILED ({code}) after {took:.0f}s; {log}:\n      " + "\n      ".join(tail), file=sys.stderr)
            else:
                print(f"    done in {took:.0f}s", file=sys.stderr)
    finally:
        if challenger is not None:
            set_alias(client, model, CHALLENGER, challenger)
    return failed


# ---------------------------------------------------------------------------------------------
# reading the results back


def read_runs(wanted: list[tuple[str, int, str]], params_file: Path = Path(DVC_PARAMS_FILE)) -> list[Run]:
    """The named experiments of the current baseline, from `dvc exp show --json`."""
    shown = json.loads(dvc("exp", "show", "--json", "--no-pager").stdout)
    found = experiments_by_name(shown, git("rev-parse", "HEAD").stdout.strip())
    runs = []
    for method, seed, name in wanted:
        if name not in found:
            raise AblationError(f"experiment {name} ran but is not in `dvc exp show`")
        rev, data = found[name]
        metrics = data["metrics"]
        rl_params = data["params"][params_file.as_posix()]["data"]["rl"]
        curves = git("show", f"{rev}:plots/rl_curves.csv").stdout
        evaluate = merge(metrics["metrics/evaluate.json"]["data"], read_detail(rev, name))
        runs.append(Run(method, seed, name, metrics["metrics/rl.json"]["data"], evaluate,
                        rl_params["images_per_epoch"], rl_params["group_size"], read_curves(curves)))
    return runs


def read_detail(rev: str, name: str) -> dict:
    """metrics/evaluate_detail.json as experiment `name` (commit `rev`) wrote it: a `cache: false`
    output, so DVC commits it with the experiment; `dvc exp show` lists metrics files only."""
    shown = git("show", f"{rev}:{DETAIL_FILE}", check=False)
    if shown.returncode != 0:
        raise AblationError(f"experiment {name} ({rev[:7]}) has no {DETAIL_FILE} in its commit: its dvc.yaml must "
                            f"list it under the evaluate stage's outs with `cache: false` (restorl's does)")
    return json.loads(shown.stdout)


def experiments_by_name(shown: list[dict], baseline: str) -> dict[str, tuple[str, dict]]:
    """name -> (commit, data) of the experiments based on `baseline` in `dvc exp show --json`."""
    out = {}
    for top in shown:
        if top.get("rev") != baseline:
            continue
        for exp in top.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") and rev.get("data"):
                    out[rev["name"]] = (rev["rev"], rev["data"])
    return out


def read_curves(text: str) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


# ---------------------------------------------------------------------------------------------
# the tables


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def mean_std(values: list[float], fmt: str = ".4f") -> str:
    """`mean ± std` in format `fmt` (a leading `+` signs the mean only); the mean alone for one value."""
    mean, std = _stats(values)
    return f"{mean:{fmt}}" if len(values) == 1 else f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}"


def higher_is_better(evaluate: dict, metric: str) -> bool:
    return evaluate.get("higher_is_better", {}).get(metric, metric != REALISM)


def gain(interval: dict, up: bool) -> float:
    """The paired difference from SFT read as a gain: positive is better, whichever way the metric points."""
    return interval["diff"] if up else -interval["diff"]


def interval_text(f: dict, fmt: str) -> str:
    return f"{f['diff']:+{fmt}} [{f['lo']:+{fmt}}, {f['hi']:+{fmt}}]"


def verdict_counts(intervals: list[dict], up: bool) -> str:
    """How the seeds' intervals against SFT read: `better 3/3`, `better 2/3, unclear 1/3`, ..."""
    said = [interval_verdict(f, up) for f in intervals]
    return ", ".join(f"{v} {said.count(v)}/{len(said)}" for v in ("better", "unclear", "worse") if v in said)


def verdict(group: list[Run], flipped: list[Run]) -> str:
    """`yes` where the method's runs (`group`, one per seed) clear the bar of "RL improves",
    else `no: ` and every condition that fails.

    The bar: on the held-out judge and on realism (the judges RL never trained on) each, the
    mean gain over SFT across seeds beats every hack control's gain and the sign-flipped run's
    mean gain, and in every seed the paired 95 % interval of RL against SFT (evaluate's
    `vs_sft.rl`) clears zero on the better side; the test PSNR, mean over seeds, is at most
    0.1 dB (PSNR_LOSS_OVERALL) below SFT's overall and at most 0.3 dB (PSNR_LOSS_TASK) below it
    on every task (`per_task`). The controls and SFT are the same in every run (they do not
    depend on rl.seed): they are read from the first."""
    reasons = []
    first = group[0].evaluate
    controls = {row: f for row, f in first["vs_sft"].items() if row.startswith("sft_")}
    for m in BAR_JUDGES:
        up = higher_is_better(first, m)
        if any(m not in r.evaluate["vs_sft"]["rl"] for r in group):
            reasons.append(f"no {m} figures")
            continue
        mine = _stats([gain(r.evaluate["vs_sft"]["rl"][m], up) for r in group])[0]
        beaten = [row.removeprefix("sft_") for row, f in controls.items() if m in f and gain(f[m], up) >= mine]
        if beaten:
            reasons.append(f"{m} gain {mine:+.3g} within {', '.join(beaten)}")
        theirs = [gain(r.evaluate["vs_sft"]["rl"][m], up) for r in flipped if m in r.evaluate["vs_sft"]["rl"]]
        if theirs and mine <= _stats(theirs)[0]:
            reasons.append(f"{m} gain {mine:+.3g} within the flipped run")
        unsure = [r.seed for r in group if interval_verdict(r.evaluate["vs_sft"]["rl"][m], up) != "better"]
        if unsure:
            reasons.append(f"{m} interval not above 0 (seed {', '.join(map(str, unsure))})")
    # rounded to evaluate's 4 decimals, so that a loss of 0.1 dB is 0.1, not 0.1000000000000014
    loss = round(_stats([r.evaluate["overall"]["sft"]["psnr"] - r.evaluate["overall"]["rl"]["psnr"] for r in group])[0], 4)
    if loss > PSNR_LOSS_OVERALL:
        reasons.append(f"PSNR -{loss:.2f} dB overall")
    for task in first.get("per_task", {}):
        loss = round(_stats([r.evaluate["per_task"][task]["sft"]["psnr"] - r.evaluate["per_task"][task]["rl"]["psnr"]
                             for r in group])[0], 4)
        if loss > PSNR_LOSS_TASK:
            reasons.append(f"PSNR -{loss:.2f} dB on {task}")
    return "yes" if not reasons else "no: " + "; ".join(reasons)


def _metrics(runs: list[Run]) -> list[tuple[str, str, str]]:
    """The TEST_METRICS some run has, as (metric, header with its arrow, format)."""
    present = {m for r in runs for m in r.evaluate["overall"].get("sft", {})}
    first = runs[0].evaluate
    return [(m, f"{name} {'↑' if higher_is_better(first, m) else '↓'}", fmt)
            for m, name, fmt in TEST_METRICS if m in present]


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _methods(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """(method, its runs) in the order they ran; the flipped run last."""
    methods = list(dict.fromkeys(r.method for r in runs))
    methods = [m for m in methods if m != FLIPPED] + [m for m in methods if m == FLIPPED]
    return [(m, [r for r in runs if r.method == m]) for m in methods]


def _controls(evaluate: dict) -> list[tuple[str, str]]:
    """(row, label) of SFT and the hack controls."""
    rows = ["sft"] + sorted(k for k in evaluate["overall"] if k.startswith("sft_"))
    return [(row, "SFT" if row == "sft" else "SFT + " + row.removeprefix("sft_")) for row in rows]


def results_table(runs: list[Run]) -> str:
    """One row per method (over its seeds, the flipped run among them), then SFT and its hack
    controls (one value: they do not depend on rl.seed): the overall test figures, the verdict
    and, from metrics/rl.json, the val reward gain, best epoch, RL time and rollouts."""
    metrics = _metrics(runs)
    header = (["row", "seeds"] + [h for _, h, _ in metrics]
              + ["RL improves?", "val reward gain", "best epoch", "RL s", "rollouts"])
    lines = [_line(header), "|" + "---|" * len(header)]
    flipped = [r for r in runs if r.method == FLIPPED]
    for method, group in _methods(runs):
        cells = [LABELS.get(method, method), ",".join(str(r.seed) for r in group)]
        cells += [mean_std([r.evaluate["overall"]["rl"][m] for r in group], f) if m in group[0].evaluate["overall"]["rl"]
                  else "–" for m, _, f in metrics]
        cells += ["–" if method == FLIPPED else verdict(group, flipped),
                  mean_std([r.rl["val_reward_gain"] for r in group], ".3g"),
                  mean_std([r.rl["best_epoch"] for r in group], ".1f"),
                  mean_std([r.rl["seconds"] for r in group], ".1f"),
                  "/".join(str(n) for n in sorted({r.rl["rollouts"] for r in group}))]
        lines.append(_line(cells))
    overall = runs[0].evaluate["overall"]
    for row, label in _controls(runs[0].evaluate):
        cells = [label, "–"] + [f"{overall[row][m]:{f}}" if m in overall[row] else "–" for m, _, f in metrics]
        lines.append(_line(cells + ["–"] * 5))
    return "\n".join(lines)


def intervals_table(runs: list[Run]) -> str:
    """Against SFT on the same test patches (evaluate's `vs_sft`): each run's mean paired
    difference with its 95 % interval, one line per seed, then per method the mean ± std over
    seeds and how the seeds' intervals read; then each hack control's interval (one value)."""
    metrics = _metrics(runs)
    first = runs[0].evaluate
    lines = [_line(["row", "seed"] + [h for _, h, _ in metrics]), "|" + "---|" * (2 + len(metrics))]
    for method, group in _methods(runs):
        label = LABELS.get(method, method)
        for r in group:
            rl = r.evaluate["vs_sft"]["rl"]
            lines.append(_line([label, str(r.seed)] + [interval_text(rl[m], DIFF_FORMATS[m]) if m in rl else "–"
                                                      for m, _, _ in metrics]))
        cells = []
        for m, _, _ in metrics:
            found = [r.evaluate["vs_sft"]["rl"][m] for r in group if m in r.evaluate["vs_sft"]["rl"]]
            cells.append(f"{mean_std([f['diff'] for f in found], '+' + DIFF_FORMATS[m])} "
                         f"({verdict_counts(found, higher_is_better(first, m))})" if found else "–")
        lines.append(_line([f"**{label}**", "mean"] + cells))
    for row, label in _controls(first)[1:]:
        f = first["vs_sft"][row]
        lines.append(_line([label, "–"] + [f"{interval_text(f[m], DIFF_FORMATS[m])} "
                                           f"{interval_verdict(f[m], higher_is_better(first, m))}" if m in f else "–"
                                           for m, _, _ in metrics]))
    return "\n".join(lines)


def task_table(runs: list[Run]) -> str:
    """Per degradation task (evaluate_detail.json's `per_task_vs_sft`): each method's and each
    control's difference from SFT on the task's test patches in PSNR, judge and realism; for a
    method the mean ± std over seeds and how the seeds' intervals read, for a control its
    interval and verdict. Empty when the runs hold no per-task intervals."""
    first = runs[0].evaluate
    per_task = first.get("per_task_vs_sft")
    if not per_task:
        return ""
    metrics = [(m, f"{name} {'↑' if higher_is_better(first, m) else '↓'}") for m, name in TASK_METRICS]
    lines = [_line(["task", "n", "row"] + [f"{h} vs SFT" for _, h in metrics]), "|" + "---|" * (3 + len(metrics))]
    for task, controls in per_task.items():
        n = str(first["per_task"][task]["n"])
        for method, group in _methods(runs):
            cells = []
            for m, _ in metrics:
                found = [r.evaluate["per_task_vs_sft"][task]["rl"][m] for r in group
                         if m in r.evaluate.get("per_task_vs_sft", {}).get(task, {}).get("rl", {})]
                cells.append(f"{mean_std([f['diff'] for f in found], '+' + DIFF_FORMATS[m])} "
                             f"({verdict_counts(found, higher_is_better(first, m))})" if found else "–")
            lines.append(_line([task, n, LABELS.get(method, method)] + cells))
        for row, label in _controls(first)[1:]:
            f = controls.get(row, {})
            lines.append(_line([task, n, label] + [f"{interval_text(f[m], DIFF_FORMATS[m])} "
                                                   f"{interval_verdict(f[m], higher_is_better(first, m))}"
                                                   if m in f else "–" for m, _ in metrics]))
    return "\n".join(lines)


def epoch_table(runs: list[Run], methods: tuple[str, ...], keys: dict[str, str]) -> str:
    """Per epoch: rollouts so far, and for each method each curve key (plots/rl_curves.csv
    column -> header), mean ± std over seeds; empty unless a method ran."""
    present = [m for m in methods if any(r.method == m for r in runs)]
    if not present:
        return ""
    epochs = sorted({int(row["epoch"]) for r in runs if r.method in present for row in r.curves})
    per_epoch = {r.method: r.images_per_epoch * r.group_size for r in runs if r.method in present}
    header = ["epoch", "rollouts"] + [f"{m} {label}" for m in present for label in keys.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epoch in epochs:
        cells = [str(epoch), "/".join(str(b) for b in sorted({epoch * per_epoch[m] for m in present}))]
        for m in present:
            rows = [row for r in runs if r.method == m for row in r.curves if int(row["epoch"]) == epoch]
            for key in keys:
                cells.append(mean_std([row[key] for row in rows]) if rows and key in rows[0] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_table(runs: list[Run]) -> str:
    """CoCA's claim: reward reached against rollouts, against the DDPO baseline."""
    return epoch_table(runs, ("ddpo", "coca"), {"reward.final.mean": "rollout reward", "val_reward": "val reward"})


def weighting_table(runs: list[Run]) -> str:
    """The difficulty-adaptive mix against uniform weighting, val reward and PSNR per epoch."""
    return epoch_table(runs, (SEED_METHOD, "uniform"), {"val_reward": "val reward", "val_psnr": "val PSNR"})


def report(runs: list[Run]) -> str:
    """The markdown of the results, interval and per-task tables and, where their methods ran,
    the per-epoch tables."""
    seeds = sorted({r.seed for r in runs})
    budget = sorted({(r.rl["epochs"], r.rl["rollouts"]) for r in runs})
    parts = [
        (f"## RL ablation ({len(runs)} runs; rl.seed {', '.join(map(str, seeds))}; "
         f"epochs/rollouts per run {', '.join(f'{e}/{n}' for e, n in budget)})"),
        "",
        ("Test split (metrics/evaluate.json and evaluate_detail.json of each DVC experiment; RL rows mean ± std "
         "over seeds, SFT and the hack controls one value: they do not depend on rl.seed). `reward` is the learned "
         "reward RL trained on; `judge` (held-out judge) and `realism` (kernel MMD² of image statistics from GT's, "
         "lower is closer) are judges RL never trained on. RL improves? (`verdict`): the gain over SFT on the judge "
         "and on realism, each, beats every hack control's and the sign-flipped run's, with the paired 95 % "
         "interval of RL against SFT above zero in every seed; PSNR at most "
         f"{PSNR_LOSS_OVERALL:g} dB below SFT overall and at most {PSNR_LOSS_TASK:g} dB on every task. Val reward "
         "gain (best epoch over SFT) and best epoch from metrics/rl.json, in each run's own rl.reward (flipped for "
         "the sign-flipped row, composite for LRPO). Best epoch 0: no epoch beat SFT, so the shipped model is SFT. "
         "RL s: the rl stage's training loop (wall seconds)."),
        "",
        results_table(runs),
        "",
        ("Against SFT on the same test patches (evaluate_detail.json `vs_sft`): mean paired difference "
         "[95 % bootstrap interval; realism: over random halves of each task's patches], per seed; per method "
         "the mean ± std over seeds and how many seeds' intervals read better / unclear / worse (in the metric's "
         "direction); each hack control's own interval."),
        "",
        intervals_table(runs),
    ]
    tasks = task_table(runs)
    if tasks:
        from pipeline.rewards.realism import MIN_TASK_PATCHES

        parts += ["", ("Per task (evaluate_detail.json `per_task_vs_sft`): difference from SFT on the task's test "
                       "patches; methods mean ± std over seeds (intervals' verdicts per seed), controls their "
                       "interval. Realism per task: the task's own MMD² (– with fewer than "
                       f"{MIN_TASK_PATCHES} patches)."), "", tasks]
    weighting = weighting_table(runs)
    if weighting:
        parts += ["", ("Difficulty-adaptive vs uniform weighting (plots/rl_curves.csv): val reward and val PSNR "
                       "after each epoch, mean ± std over seeds; same data, seeds and rollouts."), "", weighting]
    efficiency = efficiency_table(runs)
    if efficiency:
        parts += ["", ("Sample efficiency (plots/rl_curves.csv): reward of each epoch's rollouts (before its "
                       "update) and val reward after it, against rollouts so far; mean ± std over seeds."),
                  "", efficiency]
    return "\n".join(parts)
