"""Realism at the level of the distribution: how far a set of outputs' image statistics lie
from GT's, a judge no reward in restorl trains on.

Each patch becomes a vector of statistics that restoration failures move: the size and spread
of its Haar wavelet details at two scales (over-smoothing shrinks them, noise and ringing grow
them), the histogram of its gradient magnitudes, and its colour means and spreads, each
standardised by GT's own spread.

Only what one could see counts: the wavelet details' sizes are taken as log(size + 1/255), so
details below one 8-bit grey level hardly move them, and the gradient histogram puts every
gradient under 0.02 (about 5 grey levels) in one bin. Without these floors a 1/255 dither,
invisible and a hack control, moved GT's realism by 29 % of what a 3x3 blur does on val (13 %
on train): standardised by GT's tiny spread on flat patches, sub-grey-level changes counted
as much as visible ones. With them: 3 % on val, 1 % on train (`bench/realism_controls.py`;
docs/results.md, where the floors were chosen on val and train, never on test). The distance of a set of outputs from GT is the unbiased
kernel MMD^2 (Gretton et al., "A Kernel Two-Sample Test", 2012) with a Gaussian kernel whose
width is the median squared distance between GT patches, the family of the kernel inception
distance (Binkowski et al., "Demystifying MMD GANs", 2018), here on these statistics rather
than an Inception network's features (none can be downloaded here, and 32 px patches are far
below what it was trained on). A bounded kernel: the cubic kernel of KID let a few extreme
statistics (the log of a blurred patch's vanishing details) own the figure.

It is taken per degradation task (outputs against the GT of the same task's patches) and
averaged over the tasks: pooled over tasks, over-smoothed and noisy outputs mix into a spread
that resembles GT's. Lower is closer to GT; GT against itself is 0 up to the estimator's
noise (it can go slightly negative). Reported x 100.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Of |grad| of Y in [0, 1]; gradients under 0.02 (about 5 grey levels) share the first bin.
GRADIENT_BINS = torch.tensor([0.0, 0.02, 0.04, 0.08, 0.16, 0.32])
DETAIL_FLOOR = 1 / 255  # one 8-bit grey level, added to the wavelet details' sizes before their log


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma (Rec. 601 weights) in [0, 1], float64, of (N, 3, H, W) images in [-1, 1]."""
    rgb = (images.double().clamp(-1, 1) + 1) / 2
    return (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]


def _haar(y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One level of the orthonormal 2-D Haar transform: the approximation and the LH, HL, HH details."""
    a, b, c, d = y[..., 0::2, 0::2], y[..., 0::2, 1::2], y[..., 1::2, 0::2], y[..., 1::2, 1::2]
    return (a + b + c + d) / 2, [(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2]


# The columns of `statistics`, by what they measure (bench/realism_controls.py scores each alone).
STATISTIC_GROUPS = {"haar_level1": range(0, 6), "haar_level2": range(6, 12),
                    "gradient_histogram": range(12, 12 + len(GRADIENT_BINS)),
                    "colour": range(12 + len(GRADIENT_BINS), 18 + len(GRADIENT_BINS))}


def statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 24) statistics of (N, 3, H, W) images in [-1, 1] (H and W even), in the order of
    STATISTIC_GROUPS: per Haar level, the log mean and log spread of |LH|, |HL|, |HH| (each
    plus DETAIL_FLOOR); the gradient-magnitude histogram; the RGB means and spreads."""
    y = luma(images)
    stats = []
    approx = y
    for _ in range(2):
        approx, details = _haar(approx)
        for band in details:
            stats += [torch.log(band.abs().mean(dim=(1, 2, 3)) + DETAIL_FLOOR),
                      torch.log(band.std(dim=(1, 2, 3)) + DETAIL_FLOOR)]
    gx, gy = y[..., :, 1:] - y[..., :, :-1], y[..., 1:, :] - y[..., :-1, :]
    magnitude = torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).flatten(1)
    bins = torch.bucketize(magnitude, GRADIENT_BINS.double(), right=True) - 1
    histogram = F.one_hot(bins, len(GRADIENT_BINS)).double().mean(dim=1)
    rgb = (images.double().clamp(-1, 1) + 1) / 2
    return torch.cat([torch.stack(stats, dim=1), histogram, rgb.mean(dim=(2, 3)), rgb.std(dim=(2, 3))], dim=1)


def kernels(x: torch.Tensor, y: torch.Tensor, width: float) -> tuple[torch.Tensor, ...]:
    """k(x, x), k(y, y), k(x, y) with k(a, b) = exp(-|a - b|^2 / width)."""
    return tuple(torch.exp(-torch.cdist(a, b) ** 2 / width) for a, b in ((x, x), (y, y), (x, y)))


def mmd(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor, rows: torch.Tensor) -> float:
    """Unbiased MMD^2 between paired feature sets on `rows`, from their kernel matrices: the
    U-statistic over pairs i != j (Gretton et al.'s MMD^2_u), which also leaves out the cross
    terms k(x_i, y_i) of a patch with its own GT, so a set equal to GT scores exactly 0."""
    n = len(rows)
    return float(_pair_terms((kxx, kyy, kxy), rows)[~torch.eye(n, dtype=torch.bool)].sum() / (n * (n - 1)))


MIN_TASK_PATCHES = 4  # a task with fewer patches is left out (each half needs 2); none left: pooled


def _statistics(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) as their `statistics`; (N, 24) statistics as they are (a split scored
    batch by batch keeps only these)."""
    return statistics(x) if x.dim() == 4 else x


class Realism:
    """Distances of image sets from one GT set (`gt`, with the `tasks` of its patches). Every
    image set, `gt` included, may be given as images or as their `statistics`."""

    SCALE = 100.0

    def __init__(self, gt: torch.Tensor, tasks: list[str]):
        features = _statistics(gt)
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        self.gt = self.features(gt)
        squared = torch.cdist(self.gt, self.gt) ** 2
        self.width = float(squared[squared > 0].median()) if (squared > 0).any() else 1.0
        groups = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
        kept = [torch.tensor(rows) for rows in groups.values() if len(rows) >= MIN_TASK_PATCHES]
        self.groups = kept or [torch.arange(len(tasks))]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return (_statistics(images) - self.mean) / self.std

    def distance(self, images: torch.Tensor) -> float:
        """Mean over the task groups of MMD^2 x 100 between `images` (one per GT patch, in
        order) and GT on the same patches."""
        return self._distance(kernels(self.features(images), self.gt, self.width), self.groups)

    def _distance(self, k: tuple[torch.Tensor, ...], groups: list[torch.Tensor]) -> float:
        return self.SCALE * sum(mmd(*k, g) for g in groups) / len(groups)

    def interval(self, row: torch.Tensor, sft: torch.Tensor, generator: torch.Generator,
                 resamples: int = 2000) -> dict[str, float]:
        """The distance of images `row` minus SFT's images', and the 2.5 / 97.5 % points of that
        difference over random halves of each task's patches (the same halves for both).
        Halves, not resamples with replacement: a repeated patch would count as its own
        neighbour in the kernel sums; halves make the interval wider than a bootstrap's.

        The halves of a group are summed all at once: with a half as a 0/1 vector h and the
        group's matrix M of row minus SFT (`_pair_terms`), its pairs i != j sum to
        h^T M h - sum_i h_i M_ii."""
        k_row, k_sft = (kernels(self.features(x), self.gt, self.width) for x in (row, sft))
        sizes = [max(2, len(g) // 2) for g in self.groups]
        picks = [[] for _ in self.groups]
        for _ in range(resamples):  # drawn resample by resample, group by group
            for g, group in enumerate(self.groups):
                picks[g].append(torch.randperm(len(group), generator=generator)[:sizes[g]])
        diffs = torch.zeros(resamples, dtype=torch.float64)
        for group, size, chosen in zip(self.groups, sizes, picks):
            halves = torch.zeros(resamples, len(group), dtype=torch.float64).scatter_(1, torch.stack(chosen), 1.0)
            m = _pair_terms(k_row, group) - _pair_terms(k_sft, group)
            diffs += (((halves @ m) * halves).sum(1) - halves @ m.diagonal()) / (size * (size - 1))
        diffs *= self.SCALE / len(self.groups)
        lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        diff = self._distance(k_row, self.groups) - self._distance(k_sft, self.groups)
        return {"diff": round(diff, 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def _pair_terms(k: tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
    """M[i, j] = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i) on `rows`: the MMD^2_u of
    a subset of them is the sum of M over its pairs i != j, over n (n - 1) (`mmd`)."""
    kxx, kyy, kxy = (m[rows][:, rows] for m in k)
    return kxx + kyy - kxy - kxy.T
