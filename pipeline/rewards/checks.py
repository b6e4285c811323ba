"""The learned reward's acceptance checks on held-out data, and what fails them.

The `reward` stage measures them on the val split: every figure goes to `checks.json` in the
model's folder (and MLflow), the headline (`headline`) to metrics/reward.json; the `rl` stage
refuses to optimise a reward that failed them unless `rl.allow_failed_reward_checks` says so.
The `judge` stage writes its checks the same way (checkpoints/judge, metrics/judge.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.rewards.scorers import RewardError

# The reward must rank GT above LQ and above the SFT output this often on val, and score every
# hack control (pipeline/rewards/hacks.py) of the SFT output below the output itself on average.
MIN_GT_ABOVE_LQ = 0.95
MIN_GT_ABOVE_SFT = 0.80
CHECKS_FILE = "checks.json"  # in the model's folder: every figure of its checks


def failures(checks: dict) -> list[str]:
    """Why a reward's checks (the figures of its checks.json) fail; empty when they pass."""
    found = []
    if checks["gt_above_lq"] < MIN_GT_ABOVE_LQ:
        found.append(f"gt_above_lq {checks['gt_above_lq']:.3f} < {MIN_GT_ABOVE_LQ}")
    if checks["gt_above_sft"] < MIN_GT_ABOVE_SFT:
        found.append(f"gt_above_sft {checks['gt_above_sft']:.3f} < {MIN_GT_ABOVE_SFT}")
    sft = checks["mean"]["sft"]
    found += [f"hack {name} {value:.4g} above the SFT output's {sft:.4g}"
              for name, value in checks["hack_mean"].items() if value > sft]
    return found


def headline(checks: dict) -> dict:
    """The figures a DVC metrics file keeps: both ranking rates, how many hack controls score
    above the SFT output on average (0 to pass), and the verdict."""
    sft = checks["mean"]["sft"]
    return {"gt_above_lq": checks["gt_above_lq"], "gt_above_sft": checks["gt_above_sft"],
            "hacks_above_sft": sum(value > sft for value in checks["hack_mean"].values()),
            "passed": checks["passed"]}


def require_passed(model_dir: Path, allow_failed: bool) -> list[str]:
    """The failures recorded in the checks of the reward model in `model_dir`; a RewardError
    naming the file and each failed check unless `allow_failed`."""
    path = Path(model_dir) / CHECKS_FILE
    if not path.exists():
        found = [f"{path} not found (the reward stage did not check this reward)"]
    else:
        found = failures(json.loads(path.read_text()))
    if found and not allow_failed:
        raise RewardError(f"{path}: the learned reward did not pass its held-out checks ({'; '.join(found)}); RL would "
                          "optimise a reward that misranks images. Train a better reward (reward.steps, "
                          "pipeline/profiles/quality.yaml) or set rl.allow_failed_reward_checks: true to train anyway")
    return found
