"""`promote`: move the `champion` alias to the `challenger` version when it earns it.

Both versions are loaded through their pyfunc flavour (what a deployment loads), restore the
same prepared test split with `evaluate.sampling`, and are scored with the configured reward
(any pyiqa metric name, pipeline/rewards/iqa.py) plus PSNR and SSIM. The challenger wins when
its reward improves by at least `promote.min_reward_gain` (in the reward's better direction)
and neither PSNR nor SSIM falls below the champion's by more than its tolerance. A first model
(no champion yet) becomes champion once it can be scored.

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
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.redaction import redact
from pipeline.atomic import atomic_file
from pipeline.config import Params
from pipeline.data.dataset import PairedSplit, load_split
from pipeline.device import setup_runtime
from pipeline.errors import UserError
from pipeline.model_registry import CHALLENGER, CHAMPION, alias_version, set_alias
from pipeline.models.sampling import restore_split
from pipeline.paths import Paths
from pipeline.rewards import iqa
from pipeline.storage import pyiqa_cache_dir

SECTIONS = ["promote", "evaluate"]
FIDELITY = ("psnr", "ssim")
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
    run_id: str | None = None


def run(params: Params, root: Path = Path(".")) -> Decision:
    paths = Paths(root)
    name = params.tracking.registered_model
    tracking.configure(params, root)
    client = MlflowClient()
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise PromotionError(f"registered model '{name}' has no '{CHALLENGER}' version "
                             f"at {redact(mlflow.get_tracking_uri())}; train a model first")
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

    device = setup_runtime(params.runtime)
    test = load_split(paths.data, "test")
    figures = {"challenger": score_version(name, challenger, test, params, device)}
    if champion is not None:
        figures["champion"] = score_version(name, champion, test, params, device)
    outcome, reason = judge(figures, params)
    decision = Decision(outcome, challenger, champion, reason, reward, figures)

    with tracking.stage_run("promote", params, SECTIONS, root) as active:
        decision.run_id = active.info.run_id
        mlflow.set_tags({TAG + "decision": outcome, TAG + "challenger": challenger,
                         TAG + "champion": champion or "none", TAG + "reason": reason[:5000]})
        mlflow.log_metrics({f"{who}.{m}": v for who, fig in figures.items() for m, v in fig.items()}
                           | {"promoted": float(outcome == PROMOTED)})
        version_tags = {"decision": outcome, "reason": reason[:5000], "against": champion or "none",
                        "reward_name": reward, "run_id": decision.run_id}
        version_tags |= {m: f"{v:.6g}" for m, v in figures["challenger"].items()}
        version_tags |= {f"champion_{m}": f"{v:.6g}" for m, v in figures.get("champion", {}).items()}
        for k, v in version_tags.items():
            client.set_model_version_tag(name, challenger, TAG + k, v)
        if outcome == PROMOTED:
            set_alias(client, name, CHAMPION, challenger)
        # Written last: a promote killed before this point is redone, not skipped.
        client.set_model_version_tag(name, challenger, TAG + "key", key)
        _report(decision, paths)
        mlflow.log_artifact(str(paths.metrics / "promote.json"))
    return decision


def decision_key(params: Params, paths: Paths, champion: str | None) -> str:
    """What a decision depends on besides the challenger: champion, test data, settings."""
    manifest = paths.manifest.read_bytes() if paths.manifest.exists() else b""
    blob = json.dumps({"champion": champion, "data": hashlib.sha256(manifest).hexdigest(),
                       "settings": params.section_hash(*SECTIONS), "seed": params.runtime.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def score_version(name: str, version: str, test: PairedSplit, params: Params, device) -> dict[str, float]:
    """Mean reward, PSNR and SSIM of one registered version's restorations of `test`."""
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        model = pyfunc.unwrap_python_model().model.to(device)
    except (MlflowException, OSError, AttributeError) as err:
        raise PromotionError(f"{name} v{version}: cannot load its pyfunc model: {err}") from None
    restored = restore_split(model, test, params, progress=True).to(device)
    gt = test.gt.to(device)
    reward, weights_dir = params.promote.reward, pyiqa_cache_dir(params.storage)
    try:
        ref = gt if iqa.needs_reference(reward) else None
        figures = {"reward": float(iqa.score(reward, restored, ref, weights_dir=weights_dir).mean())}
        figures |= {m: float(iqa.score(m, restored, gt, weights_dir=weights_dir).mean()) for m in FIDELITY}
    except iqa.MetricError as err:
        raise PromotionError(f"{name} v{version}: figures missing, refusing to decide: {err}") from None
    bad = [m for m, v in figures.items() if not math.isfinite(v)]
    if bad:
        raise PromotionError(f"{name} v{version}: figures missing (non-finite {bad}), refusing to decide")
    return figures


def judge(figures: dict[str, dict[str, float]], params: Params) -> tuple[str, str]:
    """(outcome, reason) from the challenger's and the champion's figures."""
    cfg = params.promote
    for who, fig in figures.items():
        missing = [m for m in ("reward", *FIDELITY) if m not in fig or not math.isfinite(fig[m])]
        if missing:
            raise PromotionError(f"{who}: figures {missing} missing, refusing to decide")
    new = figures["challenger"]
    if "champion" not in figures:
        return PROMOTED, f"first model: no {CHAMPION} yet"
    old = figures["champion"]
    sign = -1.0 if iqa.lower_is_better(cfg.reward) else 1.0
    gain = sign * (new["reward"] - old["reward"])
    failures = []
    if gain < cfg.min_reward_gain:
        failures.append(f"{cfg.reward} gain {gain:+.4g} < required {cfg.min_reward_gain:+.4g} "
                        f"({new['reward']:.4g} vs champion {old['reward']:.4g})")
    for m, tol in (("psnr", cfg.psnr_tolerance), ("ssim", cfg.ssim_tolerance)):
        if new[m] < old[m] - tol:
            failures.append(f"{m} {new[m]:.4g} is more than {tol:g} below champion {old[m]:.4g}")
    if failures:
        return REFUSED, "; ".join(failures)
    return PROMOTED, (f"{cfg.reward} gain {gain:+.4g} >= {cfg.min_reward_gain:+.4g}; psnr {new['psnr']:.4g} "
                      f"(champion {old['psnr']:.4g}), ssim {new['ssim']:.4g} (champion {old['ssim']:.4g}) "
                      "within tolerance")


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
