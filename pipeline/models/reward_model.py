"""restorl's no-reference IQA reward model: a small residual CNN, trained here.

pyiqa's CNNIQA (Kang et al., "Convolutional Neural Networks for No-Reference Image Quality
Assessment", 2014) builds without weights, but on our 32 px patches it barely learned in the
CPU budget (Bradley-Terry loss stuck near log 2, noisy LQ ranked above GT). What made the
difference (measurements in docs/results.md):

- a fixed high-pass channel next to the image (the image minus its 5x5 binomial blur), the
  local mean-subtracted front end of BRISQUE (Mittal et al., "No-Reference Image Quality
  Assessment in the Spatial Domain", 2012): distortions live in the high frequencies, the
  content's brightness does not, and the net no longer has to learn that first;
- a lossless 2x2 pixel-unshuffle, two residual stages (He et al., "Deep Residual Learning", 2016)
  at 16 and 8 px, then mean and standard deviation pooling and a small MLP head.

Inputs are rounded to 8 bits with a straight-through gradient: a change below one grey level
(a sub-quantum dither) cannot move the score, yet gradients still flow for reward feedback.

The score of an image is the mean over its 8 dihedral views (rotations and flips), the usual
test-time augmentation: image quality does not depend on orientation, and the mean is less
sensitive to the one view the net happens to misjudge (docs/results.md). Training scores one
random view per batch (`score_view`), as the batch itself is transformed at random.
The score is differentiable end to end; there is no dropout or batch norm, so train and eval
modes score alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class ResidualBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 5x5 binomial blur (reflect padding), per channel."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (k[:, None] * k[None] / 256).expand(x.shape[1], 1, 5, 5)
    return x - F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


class RewardModel(torch.nn.Module):
    """`kernels`: channels of the first stage (the second has twice as many); `hidden`: the
    head's width; `blocks`: residual blocks per stage."""

    def __init__(self, kernels: int = 24, hidden: int = 64, blocks: int = 1, quantize: bool = True,
                 dihedral_mean: bool = True):
        super().__init__()
        self.config = {"kernels": kernels, "hidden": hidden, "blocks": blocks, "quantize": quantize,
                       "dihedral_mean": dihedral_mean}
        w = kernels
        self.stem = torch.nn.Sequential(torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(24, w, 3, padding=1))
        self.stage1 = torch.nn.Sequential(*[ResidualBlock(w) for _ in range(blocks)])
        self.down = torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.stage2 = torch.nn.Sequential(*[ResidualBlock(2 * w) for _ in range(blocks)])
        self.head = torch.nn.Sequential(torch.nn.Linear(5 * w, hidden), torch.nn.LeakyReLU(0.2),
                                        torch.nn.Linear(hidden, 1))
        self.quantize, self.dihedral_mean = quantize, dihedral_mean

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N,) scores, higher is better: the mean over the 8
        dihedral views (or the image as it is, with dihedral_mean off). H, W even."""
        if not self.dihedral_mean:
            return self.score_view(images)
        views = [torch.rot90(images, k, (2, 3)) for k in range(4)]
        views += [v.flip(3) for v in views]
        return torch.stack([self.score_view(v) for v in views]).mean(0)

    def score_view(self, images: torch.Tensor) -> torch.Tensor:
        """The score of the images as they are (one view)."""
        x = ((images + 1) / 2).clamp(0, 1)
        if self.quantize:
            x = x + ((x * 255).round() / 255 - x).detach()
        x = x * 2 - 1
        f1 = self.stage1(self.stem(torch.cat([x, 4 * high_pass(x)], 1)))
        f2 = F.leaky_relu(self.stage2(self.down(f1)), 0.2)
        f1 = F.leaky_relu(f1, 0.2)
        pooled = torch.cat([f2.mean(dim=(2, 3)), f2.std(dim=(2, 3)), f1.std(dim=(2, 3))], 1)
        return self.head(pooled).reshape(-1)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        (path / CONFIG).write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: Path) -> RewardModel:
        path = Path(path)
        if not (path / WEIGHTS).exists():
            raise FileNotFoundError(f"{path}: no reward model ({WEIGHTS}); run the reward stage first")
        model = cls(**json.loads((path / CONFIG).read_text()))
        try:
            model.load_state_dict(load_file(path / WEIGHTS))
        except RuntimeError as err:  # saved by another version of this architecture
            raise ValueError(f"{path}: weights do not fit this reward model ({str(err).splitlines()[0]}); "
                             "run the reward stage again") from None
        return model
