"""Seeded synthetic degradations for the restoration tasks of the seed papers.

Every degradation maps an RGB float image in [0, 1] (H, W, 3) to a degraded one of the same
size, drawing its parameters from configured ranges with the caller's generator so that a
patch's degradation is reproducible and can be recorded in the manifest.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import resize

if TYPE_CHECKING:
    from pipeline.config import DegradationConfig

Image_ = np.ndarray
Params = dict[str, float]


@dataclass(frozen=True)
class Degradation:
    name: str
    # Default [low, high] range of each parameter; params.yaml may narrow or widen them.
    default_ranges: dict[str, tuple[float, float]]
    apply: Callable[[Image_, Params, np.random.Generator], Image_]

    @property
    def param_names(self) -> list[str]:
        return sorted(self.default_ranges)

    def draw_params(self, ranges: dict[str, tuple[float, float]], rng: np.random.Generator) -> Params:
        merged = {**self.default_ranges, **ranges}
        return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in sorted(merged.items())}


def _convolve_rgb(img: Image_, kernel: np.ndarray) -> Image_:
    return np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised anti-aliased line through the centre: a linear motion-blur kernel."""
    size = int(math.ceil(length)) | 1  # odd
    kernel = np.zeros((size, size), np.float64)
    c = size // 2
    dx, dy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    for s in np.linspace(-length / 2, length / 2, 4 * size + 1):
        x, y = c + s * dx, c + s * dy
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for xi, yi, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                          (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
            if 0 <= xi < size and 0 <= yi < size:
                kernel[yi, xi] += w
    return kernel / kernel.sum()


def _disk_kernel(radius: float) -> np.ndarray:
    """Normalised disk (defocus point-spread function), 8x super-sampled at the rim."""
    size = 2 * int(math.ceil(radius)) + 1
    c = size // 2
    fine = np.linspace(-0.5 + 1 / 16, 0.5 - 1 / 16, 8)
    yy, xx = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    sub_y = yy[..., None, None] + fine[:, None]
    sub_x = xx[..., None, None] + fine[None, :]
    kernel = ((sub_x**2 + sub_y**2) <= radius**2).mean(axis=(-1, -2))
    return kernel / kernel.sum()


def gaussian_noise(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    return img + rng.normal(0.0, p["sigma"], img.shape)


def low_light(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    # Darken with a gamma curve and a gain, then add the shot/read noise a dark capture has.
    dark = p["gain"] * np.power(img, p["gamma"])
    return dark + rng.normal(0.0, p["noise"], img.shape)


def motion_blur(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    return _convolve_rgb(img, _line_kernel(p["length"], p["angle"]))


def defocus_blur(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    return _convolve_rgb(img, _disk_kernel(p["radius"]))


def downsample(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    # Super-resolution input: area-downscale by `scale`, bicubic back up to the patch size.
    h, w = img.shape[:2]
    small = resize(img, (max(1, round(h / p["scale"])), max(1, round(w / p["scale"]))),
                   order=1, anti_aliasing=True)
    return resize(small, (h, w), order=3, anti_aliasing=False)


def rain_streaks(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    # Sparse drops smeared along one direction, added as a bright semi-transparent layer.
    drops = (rng.random(img.shape[:2]) < p["density"]).astype(np.float64)
    streaks = ndimage.convolve(drops, _line_kernel(p["length"], p["angle"]), mode="wrap")
    streaks = np.clip(streaks * p["length"], 0.0, 1.0)[..., None]
    return img * (1 - p["opacity"] * streaks) + p["opacity"] * streaks


def jpeg(img: Image_, p: Params, rng: np.random.Generator) -> Image_:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=int(round(p["quality"])))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float64) / 255.0


DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in [
        Degradation("gaussian_noise", {"sigma": (0.02, 0.06)}, gaussian_noise),
        Degradation("low_light", {"gain": (0.25, 0.5), "gamma": (1.2, 1.6), "noise": (0.005, 0.015)}, low_light),
        Degradation("motion_blur", {"length": (3.0, 6.0), "angle": (0.0, 180.0)}, motion_blur),
        Degradation("defocus_blur", {"radius": (1.0, 2.0)}, defocus_blur),
        Degradation("downsample", {"scale": (2.0, 3.0)}, downsample),
        Degradation("rain_streaks", {"density": (0.01, 0.03), "length": (5.0, 9.0),
                                     "angle": (60.0, 120.0), "opacity": (0.3, 0.6)}, rain_streaks),
        Degradation("jpeg", {"quality": (15.0, 35.0)}, jpeg),
    ]
}


def to_uint8(img: Image_) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def degrade(img: Image_, chain: list[tuple[str, Params]], rng: np.random.Generator) -> np.ndarray:
    """Apply the chain in order to a float image; returns the uint8 LQ image."""
    out = img.astype(np.float64)
    for name, params in chain:
        out = np.clip(DEGRADATIONS[name].apply(out, params, rng), 0.0, 1.0)
    return to_uint8(out)


def problems(cfg: "DegradationConfig") -> list[str]:
    """`key: message` for each task or parameter name in `prepare.degradations` that no
    degradation above has."""
    found = []
    for name, task in cfg.tasks.items():
        key = f"prepare.degradations.tasks.{name}"
        if name not in DEGRADATIONS:
            found.append(f"{key}: unknown degradation '{name}'; known: {sorted(DEGRADATIONS)}")
            continue
        known = DEGRADATIONS[name].param_names
        found += [f"{key}.params.{param}: not a parameter of {name}; known: {known}"
                  for param in task.params if param not in known]
    return found


def check(cfg: "DegradationConfig", source: str | None = None) -> None:
    """A `ConfigError` naming each key of `prepare.degradations` that names no degradation or
    parameter (and `source`, the params file, when given)."""
    from pipeline.config import ConfigError

    found = problems(cfg)
    if found:
        raise ConfigError((f"{source}: " if source else "") + "invalid params: " + "; ".join(found))
