"""restorl's no-reference IQA reward model: pyiqa's CNNIQA architecture, trained here.

CNNIQA (Kang et al., 2014, as re-implemented in pyiqa) was designed for 32 px patches and
builds without pretrained weights, so it trains on CPU from restorl's own data. Inputs are
rounded to 8 bits with a straight-through gradient: a change below one grey level (a
sub-quantum dither) cannot move the score, yet gradients still flow for reward feedback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class RewardModel(torch.nn.Module):
    def __init__(self, kernels: int = 50, hidden: int = 800, quantize: bool = True):
        super().__init__()
        from pyiqa.archs.cnniqa_arch import CNNIQA

        self.config = {"kernels": kernels, "hidden": hidden, "quantize": quantize}
        self.net = CNNIQA(n_kers=kernels, n1_nodes=hidden, n2_nodes=hidden, pretrained=None)
        self.quantize = quantize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N,) scores, higher is better."""
        x = ((images + 1) / 2).clamp(0, 1)
        if self.quantize:
            x = x + ((x * 255).round() / 255 - x).detach()
        return self.net(x).reshape(-1)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        (path / CONFIG).write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: Path) -> "RewardModel":
        path = Path(path)
        if not (path / WEIGHTS).exists():
            raise FileNotFoundError(f"{path}: no reward model ({WEIGHTS}); run the reward stage first")
        model = cls(**json.loads((path / CONFIG).read_text()))
        model.load_state_dict(load_file(path / WEIGHTS))
        return model
