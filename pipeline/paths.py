"""Where each stage reads and writes, relative to a workspace root (the DVC project)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    @property
    def data(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def source_listing(self) -> Path:
        # The source images prepare reads, with checksums (the source stage): prepare's DVC dep.
        return self.root / "data" / "source.json"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def sft_model(self) -> Path:
        return self.root / "checkpoints" / "sft"

    @property
    def reward_model(self) -> Path:
        return self.root / "checkpoints" / "reward"

    @property
    def judge_model(self) -> Path:
        # The held-out judge (the judge stage): scores in `evaluate` and vetoes rl epochs on val
        # (rl.judge_guard); never a reward.
        return self.root / "checkpoints" / "judge"

    @property
    def rl_model(self) -> Path:
        return self.root / "checkpoints" / "rl"

    @property
    def difficulty_table(self) -> Path:
        # One row per scored training patch (the score stage); the RL stage's pool.
        return self.root / "data" / "difficulty.csv"

    @property
    def resume(self) -> Path:
        # Training state for resuming a killed run. Not a DVC output: DVC deletes outputs
        # before it re-runs a stage, and this must survive that.
        return self.root / "checkpoints" / "resume"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def pretrained(self) -> Path:
        # s3:// bases (model.pretrained) mirrored locally, one folder per URI.
        return self.root / ".restorl" / "pretrained"

    @property
    def run_info(self) -> Path:
        # Which MLflow run each stage logged to (<stage>.json), for the flow's stage summaries.
        return self.root / ".restorl" / "runs"
