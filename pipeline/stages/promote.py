"""`promote`: move the `champion` alias to the version the `rl` stage registered when it earns it.

The challenger is the version named in `metrics/rl.json` (this workspace's RL model, checked
against the run id the version was registered by), never whatever the global `challenger`
alias points at. Both it and the champion are loaded through their pyfunc flavour (what a
deployment loads), restore the same prepared test split with `evaluate.sampling`, and are
scored with

- the reward `promote.reward`: `learned` is the reward model in checkpoints/reward, which must be
  the one the challenger was trained with (its hash is a version tag); the challenger must gain
  at least `promote.min_reward_gain` over the champion;
- the guards `promote.guards`: full-reference judges (PSNR, SSIM and an independent one such as
  GMSD) that none of the RL reward's terms may be. Each may be worse than the *best value of the
  champion lineage* (every champion before, on the same test data and sampling) by at most its
  tolerance, so a model that games its reward is refused, and small losses cannot add up over
  a chain of promotions;
- the held-out judge (checkpoints/judge, the judge stage's no-reference model, trained on images
  neither the reward nor RL saw) with `promote.judge_guard`: the challenger's mean score may fall
  at most that much below the champion's. Both are scored by the judge in the workspace now,
  so there is no lineage best (a retrained judge re-scores every model). `null`: not checked.

A first model (no champion yet) becomes champion once it can be scored. Right before moving the
alias the champion is read again: when another promote moved it meanwhile, nothing changes and
the error says so (the registry has no atomic compare-and-set; the window is the few calls
between that read and the move).

The decision and the figures go to the challenger version's tags, an MLflow run named
`promote` and `metrics/promote.json`. Repeating a promote is a no-op: the challenger is already
champion, or its tags hold a decision with the same key (champion version, data, settings).
Figures that cannot be computed are a `PromotionError`: a refusal that changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.atomic import atomic_file
from pipeline.checkpoint import file_hash
from pipeline.config import Params
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.device import setup_runtime
from pipeline.errors import UserError
from pipeline.model_registry import CHAMPION, alias_version, set_alias
from pipeline.models.reward_model import WEIGHTS as LEARNED_WEIGHTS
from pipeline.models.sampling import restore_split
from pipeline.paths import Paths
from pipeline.redaction import redact
from pipeline.rewards import iqa
from pipeline.rewards.scorers import LearnedScorer
from pipeline.storage import pyiqa_cache_dir

SECTIONS = ["promote", "evaluate"]
LEARNED = "learned"
JUDGE = "judge"  # the held-out judge's figure
TAG = "restorl.promote."  # prefix of the decision tags on a model version
PROMOTED, REFUSED, UNCHANGED = "promoted", "refused", "unchanged"


class PromotionError(UserError, RuntimeError):
    """No decision can be made (no challenger, figures missing); nothing was changed."""


@dataclass
class Decision:
    outcome: str  # promoted | refused | unchanged
    challenger: str
    champion: str | None  # the champion it was compared with (None: there was none)
    reason: str
    reward: str
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # "challenger"/"champion" -> metric -> mean
    lineage_best: dict[str, float] = field(default_factory=dict)  # guard -> best value of the champion lineage
    run_id: str | None = None


def run(params: Params, root: Path = Path(".")) -> Decision:
    paths = Paths(root)
    name = params.tracking.registered_model
    tracking.configure(params, root)
    client = MlflowClient()
    challenger = registered_challenger(client, name, paths.metrics / "rl.json")
    champion = alias_version(client, name, CHAMPION)
    reward = params.promote.reward
    if champion == challenger:
        decision = Decision(UNCHANGED, challenger, champion, f"v{challenger} is already {CHAMPION}", reward)
        return _report(decision, paths)

    key = decision_key(params, paths, champion)
    tags = client.get_model_version(name, challenger).tags
    if tags.get(TAG + "key") == key:
        decision = Decision(UNCHANGED, challenger, champion,
                            f"v{challenger} was already judged against the same champion, data and settings: "
                            f"{tags.get(TAG + 'decision')} ({tags.get(TAG + 'reason')})", reward)
        return _report(decision, paths)
    check_judges(params, tags, paths, challenger)

    device = setup_runtime(params.runtime)
    test = load_split(paths.data, "test")
    figures = {"challenger": score_version(name, challenger, test, params, paths, device)}
    lineage_key = scoring_key(params, paths)
    if champion is not None:
        figures["champion"] = score_version(name, champion, test, params, paths, device)
        best = lineage_best(client.get_model_version(name, champion).tags, figures["champion"],
                            lineage_key, params.promote.guards)
    else:
        best = {}
    outcome, reason = judge(figures, params, best)
    decision = Decision(outcome, challenger, champion, reason, reward, figures, best)

    with tracking.stage_run("promote", params, SECTIONS, root) as active:
        decision.run_id = active.info.run_id
        now = alias_version(client, name, CHAMPION)
        if now != champion:
            raise PromotionError(f"'{CHAMPION}' moved from {_v(champion)} to {_v(now)} while v{challenger} "
                                 "was being judged (another promote?); nothing was changed: run promote again "
                                 f"to judge v{challenger} against {_v(now)}")
        mlflow.set_tags({TAG + "decision": outcome, TAG + "challenger": challenger,
                         TAG + "champion": champion or "none", TAG + "reason": reason[:5000]})
        mlflow.log_metrics({f"{who}.{m}": v for who, fig in figures.items() for m, v in fig.items()}
                           | {"promoted": float(outcome == PROMOTED)})
        version_tags = {"decision": outcome, "reason": reason[:5000], "against": champion or "none",
                        "reward_name": reward, "run_id": decision.run_id}
        version_tags |= {m: f"{v:.6g}" for m, v in figures["challenger"].items()}
        version_tags |= {f"champion_{m}": f"{v:.6g}" for m, v in figures.get("champion", {}).items()}
        if outcome == PROMOTED:  # the new champion carries its lineage's best forward
            version_tags |= {f"best.{m}": repr(v) for m, v in
                             improved_best(best, figures["challenger"], params.promote.guards).items()}
            version_tags["best_key"] = lineage_key
        for k, v in version_tags.items():
            client.set_model_version_tag(name, challenger, TAG + k, v)
        if outcome == PROMOTED:
            set_alias(client, name, CHAMPION, challenger)
        # Written last: a promote killed before this point is redone, not skipped.
        client.set_model_version_tag(name, challenger, TAG + "key", key)
        _report(decision, paths)
        mlflow.log_artifact(str(paths.metrics / "promote.json"))
    return decision


def _v(version: str | None) -> str:
    return f"v{version}" if version else "no champion"


def registered_challenger(client: MlflowClient, name: str, rl_metrics: Path) -> str:
    """The version the workspace's `rl` stage registered, as `metrics/rl.json` records it."""
    where = f"registered model '{name}' at {redact(mlflow.get_tracking_uri())}"
    if not rl_metrics.exists():
        raise PromotionError(f"{rl_metrics} not found: promote judges the version this workspace's rl stage "
                             "registered; run `restorl rl` first")
    registered = json.loads(rl_metrics.read_text()).get("registered") or {}
    if registered.get("model") != name or not registered.get("version"):
        raise PromotionError(f"{rl_metrics} names no version of {where} (it records {registered or 'none'}); "
                             "run `restorl rl` again")
    version = str(registered["version"])
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException:
        raise PromotionError(f"{rl_metrics}: v{version} does not exist in {where}; "
                             "a different tracking store than the rl stage used?") from None
    if tags.get("restorl.run_id") != registered.get("run_id"):
        raise PromotionError(f"{rl_metrics}: v{version} of {where} was registered by run "
                             f"{tags.get('restorl.run_id')}, not by this workspace's rl run "
                             f"{registered.get('run_id')}; a different tracking store than the rl stage used?")
    return version


def check_judges(params: Params, tags: dict[str, str], paths: Paths, challenger: str) -> None:
    """The reward is the one the challenger was trained with; no guard is one it was trained on."""
    cfg = params.promote
    trained_on = set(params.rl.reward)
    for metric in cfg.guards:
        if metric in trained_on:
            raise PromotionError(f"promote.guards.{metric}: the challenger was trained on {metric} (rl.reward); "
                                 "a guard must be a judge it never optimised")
        try:
            full_reference = iqa.needs_reference(metric)
        except iqa.MetricError as err:
            raise PromotionError(f"promote.guards.{metric}: {err}") from None
        if not full_reference:
            raise PromotionError(f"promote.guards.{metric}: not a full-reference metric; a guard compares "
                                 "restorations with the GT")
    if cfg.judge_guard is not None and not (paths.judge_model / LEARNED_WEIGHTS).exists():
        raise PromotionError(f"promote.judge_guard is {cfg.judge_guard} but there is no held-out judge at "
                             f"{paths.judge_model / LEARNED_WEIGHTS}: run `restorl judge` first, or set "
                             "promote.judge_guard: null to promote without it")
    if cfg.reward == LEARNED:
        trained_with = tags.get("restorl.reward_hash")
        if not trained_with:
            raise PromotionError(f"promote.reward: v{challenger} was not trained with a learned reward "
                                 "(no restorl.reward_hash tag); name a pyiqa metric instead")
        if not paths.reward_model.exists() or file_hash(paths.reward_model) != trained_with:
            raise PromotionError(f"promote.reward: {paths.reward_model} is not the reward model v{challenger} "
                                 f"was trained with (hash {trained_with}); restore it (dvc checkout) or "
                                 "retrain the rl stage")


def decision_key(params: Params, paths: Paths, champion: str | None) -> str:
    """What a decision depends on besides the challenger: champion, test data, settings, reward
    (and the judge, when it guards)."""
    manifest = paths.manifest.read_bytes() if paths.manifest.exists() else b""
    reward = file_hash(paths.reward_model) if params.promote.reward == LEARNED and paths.reward_model.exists() else ""
    judge = file_hash(paths.judge_model) if params.promote.judge_guard is not None and paths.judge_model.exists() else ""
    blob = json.dumps({"champion": champion, "data": hashlib.sha256(manifest).hexdigest(), "reward": reward,
                       **({"judge": judge} if judge else {}),
                       "settings": params.section_hash(*SECTIONS), "seed": params.runtime.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scoring_key(params: Params, paths: Paths) -> str:
    """What the guards' figures depend on besides the model: test data, sampling, seed. Lineage
    figures recorded under another key were measured on something else and are not compared."""
    manifest = paths.manifest.read_bytes() if paths.manifest.exists() else b""
    blob = json.dumps({"data": hashlib.sha256(manifest).hexdigest(), "seed": params.runtime.seed,
                       "sampling": params.evaluate.sampling.model_dump(),
                       "batch_size": params.evaluate.batch_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def better(metric: str, a: float, b: float) -> float:
    return min(a, b) if iqa.lower_is_better(metric) else max(a, b)


def lineage_best(champion_tags: dict[str, str], champion: dict[str, float], key: str,
                 guards: dict[str, float]) -> dict[str, float]:
    """Per guard, the best value the champion lineage reached: the champion's own figure and,
    when measured the same way (`key`), what its promotion recorded of its predecessors."""
    same = champion_tags.get(TAG + "best_key") == key
    best = {}
    for m in guards:
        best[m] = champion[m]
        recorded = champion_tags.get(f"{TAG}best.{m}") if same else None
        if recorded is not None:
            best[m] = better(m, best[m], float(recorded))
    return best


def improved_best(best: dict[str, float], figures: dict[str, float], guards: dict[str, float]) -> dict[str, float]:
    return {m: better(m, figures[m], best[m]) if m in best else figures[m] for m in guards}


def score_version(name: str, version: str, test: PairedSplit, params: Params, paths: Paths,
                  device: torch.device) -> dict[str, float]:
    """Mean reward, guards and (with promote.judge_guard) held-out judge score of one registered
    version's restorations of `test`."""
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        model = pyfunc.unwrap_python_model().model.to(device)
    except (MlflowException, OSError, AttributeError) as err:
        raise PromotionError(f"{name} v{version}: cannot load its pyfunc model: {err}") from None
    restored = restore_split(model, test, params, progress=True).to(device)
    gt = test.gt.to(device)
    reward, weights_dir = params.promote.reward, pyiqa_cache_dir(params.storage)
    try:
        figures = {"reward": reward_mean(reward, restored, gt, paths, params.evaluate.batch_size, weights_dir)}
        figures |= {m: float(iqa.score(m, restored, gt, weights_dir=weights_dir).mean()) for m in params.promote.guards}
        if params.promote.judge_guard is not None:
            figures[JUDGE] = learned_mean(paths.judge_model, restored, params.evaluate.batch_size)
    except iqa.MetricError as err:
        raise PromotionError(f"{name} v{version}: figures missing, refusing to decide: {err}") from None
    bad = [m for m, v in figures.items() if not math.isfinite(v)]
    if bad:
        raise PromotionError(f"{name} v{version}: figures missing (non-finite {bad}), refusing to decide")
    return figures


def reward_mean(reward: str, restored: torch.Tensor, gt: torch.Tensor, paths: Paths, batch_size: int,
                weights_dir: Path | None) -> float:
    if reward != LEARNED:
        ref = gt if iqa.needs_reference(reward) else None
        return float(iqa.score(reward, restored, ref, weights_dir=weights_dir).mean())
    return learned_mean(paths.reward_model, restored, batch_size)


def learned_mean(model_dir: Path, restored: torch.Tensor, batch_size: int) -> float:
    """Mean score of a learned no-reference model (the reward or the judge) over `restored`."""
    scorer = LearnedScorer(model_dir, restored.device)
    with torch.no_grad():
        return float(torch.cat([scorer(restored[i:i + batch_size]).cpu()
                                for i in range(0, len(restored), batch_size)]).mean())


def reward_higher_is_better(reward: str) -> bool:
    return reward == LEARNED or not iqa.lower_is_better(reward)


def judge(figures: dict[str, dict[str, float]], params: Params,
          best: dict[str, float] | None = None) -> tuple[str, str]:
    """(outcome, reason) from the challenger's and the champion's figures; `best`: per guard,
    the best value of the champion lineage (default: the champion's own figures)."""
    cfg = params.promote
    needed = ("reward", *cfg.guards, *([JUDGE] if cfg.judge_guard is not None else []))
    for who, fig in figures.items():
        missing = [m for m in needed if m not in fig or not math.isfinite(fig[m])]
        if missing:
            raise PromotionError(f"{who}: figures {missing} missing, refusing to decide")
    new = figures["challenger"]
    if "champion" not in figures:
        return PROMOTED, f"first model: no {CHAMPION} yet"
    old = figures["champion"]
    best = {m: better(m, old[m], (best or {}).get(m, old[m])) for m in cfg.guards}
    sign = 1.0 if reward_higher_is_better(cfg.reward) else -1.0
    gain = sign * (new["reward"] - old["reward"])
    failures = []
    if gain < cfg.min_reward_gain:
        failures.append(f"{cfg.reward} gain {gain:+.4g} < required {cfg.min_reward_gain:+.4g} "
                        f"({new['reward']:.4g} vs champion {old['reward']:.4g})")
    for m, tol in cfg.guards.items():
        loss = (new[m] - best[m]) if iqa.lower_is_better(m) else (best[m] - new[m])
        if loss > tol:
            failures.append(f"{m} {new[m]:.4g} is {loss:.4g} worse than the lineage's best {best[m]:.4g} "
                            f"(tolerance {tol:g}; champion {old[m]:.4g})")
    judged = ""
    if cfg.judge_guard is not None:
        drop = old[JUDGE] - new[JUDGE]
        if drop > cfg.judge_guard:
            failures.append(f"held-out judge {new[JUDGE]:.4g} fell {drop:.4g} below the champion's "
                            f"{old[JUDGE]:.4g} (promote.judge_guard {cfg.judge_guard:g})")
        judged = f"; held-out judge {new[JUDGE]:.4g} (champion {old[JUDGE]:.4g}) within promote.judge_guard"
    if failures:
        return REFUSED, "; ".join(failures)
    return PROMOTED, (f"{cfg.reward} gain {gain:+.4g} >= {cfg.min_reward_gain:+.4g}; "
                      + ", ".join(f"{m} {new[m]:.4g} (lineage's best {best[m]:.4g})" for m in cfg.guards)
                      + " within tolerance" + judged)


def _report(decision: Decision, paths: Paths) -> Decision:
    with atomic_file(paths.metrics / "promote.json") as tmp:
        tmp.write_text(json.dumps(asdict(decision), indent=2))
    return decision


def format_decision(d: Decision) -> str:
    against = f"champion v{d.champion}" if d.champion else "no champion"
    lines = [f"promote: challenger v{d.challenger} vs {against}: {d.outcome.upper()} — {d.reason}"]
    for who, fig in d.figures.items():
        lines.append(f"  {who:<10} " + "  ".join(f"{m}={v:.4f}" for m, v in fig.items()))
    return "\n".join(lines)
