"""The RL method as parts picked by name in `rl`: objective, step credit, step weighting,
difficulty weighting and regularizers (docs/rl_methods.md).

Each registry lives beside its parts (objectives.py, credit.py, difficulty.py,
regularizers.py); `pick` looks the names up once, before any work, and a name no registry
holds is a `ConfigError` naming its key. The loop then asks the picked parts what they need
(`RlParts`) instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.config import ConfigError, RlConfig
from pipeline.rl.credit import STEP_CREDIT, STEP_WEIGHTING
from pipeline.rl.difficulty import WEIGHTINGS, Weighting
from pipeline.rl.objectives import OBJECTIVES, Objective
from pipeline.rl.regularizers import REGULARIZERS, Regularizer


@dataclass(frozen=True)
class RlParts:
    objective: Objective
    step_credit: Callable
    step_weighting: Callable
    weighting: Weighting
    regularizers: tuple[Regularizer, ...]
    kl: bool  # rl.kl_beta > 0: the KL to the frozen SFT model is part of the loss

    @property
    def needs_reference(self) -> bool:
        """Whether the update runs the frozen SFT model (the KL, or a regularizer that compares with it)."""
        return self.kl or any(r.needs_reference for r in self.regularizers)

    @property
    def needs_advantages(self) -> bool:
        return self.objective.needs_advantages

    @property
    def needs_differentiable_reward(self) -> bool:
        return self.objective.needs_differentiable_reward

    @property
    def uses_sft(self) -> bool:
        return self.weighting.uses_sft


def problems(cfg: RlConfig) -> list[str]:
    """`key: message` for each name in `cfg` that its registry does not hold."""
    found = []
    for key, name, registry in (("rl.objective", cfg.objective, OBJECTIVES),
                                ("rl.step_credit", cfg.step_credit, STEP_CREDIT),
                                ("rl.step_weighting", cfg.step_weighting, STEP_WEIGHTING),
                                ("rl.difficulty.weighting", cfg.difficulty.weighting, WEIGHTINGS)):
        if name not in registry:
            found.append(f"{key}: unknown '{name}'; known: {sorted(registry)}")
    for name in cfg.regularizers:
        if name not in REGULARIZERS:
            found.append(f"rl.regularizers: unknown regularizer '{name}'; known: {sorted(REGULARIZERS)}")
    import pywt

    if cfg.refl.wavelet not in pywt.wavelist(kind="discrete"):
        found.append(f"rl.refl.wavelet: '{cfg.refl.wavelet}' is not a discrete wavelet known to PyWavelets "
                     "(e.g. haar, db2)")
    return found


def pick(cfg: RlConfig, source: str | None = None) -> RlParts:
    """The parts `cfg` names; a `ConfigError` naming the key of any unknown name (and `source`,
    the params file, when given)."""
    found = problems(cfg)
    if found:
        raise ConfigError((f"{source}: " if source else "") + "invalid params: " + "; ".join(found))
    return RlParts(OBJECTIVES[cfg.objective], STEP_CREDIT[cfg.step_credit], STEP_WEIGHTING[cfg.step_weighting],
                   WEIGHTINGS[cfg.difficulty.weighting], tuple(REGULARIZERS[n] for n in cfg.regularizers),
                   kl=cfg.kl_beta > 0)
