import numpy as np
import pytest
from skimage.data import astronaut

from pipeline.data.degradations import DEGRADATIONS, degrade

IMG = astronaut()[100:164, 200:264] / 255.0


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_each_degradation_is_seeded_and_changes_the_image(name):
    d = DEGRADATIONS[name]
    params = d.draw_params({}, np.random.default_rng(1))
    a = degrade(IMG, [(name, params)], np.random.default_rng(2))
    b = degrade(IMG, [(name, params)], np.random.default_rng(2))
    assert a.shape == IMG.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    clean = (IMG * 255 + 0.5).astype(np.uint8)
    assert np.abs(a.astype(int) - clean).mean() > 0.5, f"{name} left the image (almost) unchanged"


def test_params_are_drawn_within_configured_ranges():
    d = DEGRADATIONS["gaussian_noise"]
    rng = np.random.default_rng(0)
    draws = [d.draw_params({"sigma": (0.1, 0.2)}, rng)["sigma"] for _ in range(200)]
    assert 0.1 <= min(draws) and max(draws) <= 0.2


def test_stronger_degradation_is_further_from_the_original():
    def err(sigma):
        lq = degrade(IMG, [("defocus_blur", {"radius": sigma})], np.random.default_rng(0))
        return np.abs(lq / 255.0 - IMG).mean()

    assert err(1.0) < err(2.0) < err(4.0)


def test_low_light_darkens():
    lq = degrade(IMG, [("low_light", {"gain": 0.3, "gamma": 1.4, "noise": 0.0})], np.random.default_rng(0))
    assert lq.mean() < 0.5 * IMG.mean() * 255
