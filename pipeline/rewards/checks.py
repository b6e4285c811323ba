"""The learned reward's acceptance checks on held-out data, and what fails them.

The `reward` stage measures them on the val split (metrics/reward.json); the `rl` stage refuses
to optimise a reward that failed them unless `rl.allow_failed_reward_checks` says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.rewards.scorers import RewardError

# The reward must rank GT above LQ and above the SFT output this often on val, and score every
# hack control (pipeline/rewards/hacks.py) of the SFT output below the output itself on average.
MIN_GT_ABOVE_LQ = 0.95
MIN_GT_ABOVE_SFT = 0.80


def failures(checks: dict) -> list[str]:
    """Why a reward's checks (metrics/reward.json's figures) fail; empty when they pass."""
    found = []
    if checks["gt_above_lq"] < MIN_GT_ABOVE_LQ:
        found.append(f"gt_above_lq {checks['gt_above_lq']:.3f} < {MIN_GT_ABOVE_LQ}")
    if checks["gt_above_sft"] < MIN_GT_ABOVE_SFT:
        found.append(f"gt_above_sft {checks['gt_above_sft']:.3f} < {MIN_GT_ABOVE_SFT}")
    sft = checks["mean"]["sft"]
    found += [f"hack {name} {value:.4g} above the SFT output's {sft:.4g}"
              for name, value in checks["hack_mean"].items() if value > sft]
    return found


def require_passed(path: Path, allow_failed: bool) -> list[str]:
    """The failures recorded in `path` (metrics/reward.json); a RewardError naming the file and
    each failed check unless `allow_failed`."""
    if not Path(path).exists():
        found = [f"{path} not found (the reward stage did not check this reward)"]
    else:
        found = failures(json.loads(Path(path).read_text()))
    if found and not allow_failed:
        raise RewardError(f"{path}: the learned reward did not pass its held-out checks ({'; '.join(found)}); RL would "
                          "optimise a reward that misranks images. Train a better reward (reward.steps, "
                          "pipeline/profiles/quality.yaml) or set rl.allow_failed_reward_checks: true to train anyway")
    return found
