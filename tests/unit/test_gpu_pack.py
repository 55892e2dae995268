"""scripts/gpu_pack_data.py: the packed copy of an image normalises as the original does, tail included."""

import numpy as np
import pytest

from ..conftest import load_script
from lsmseg.normalise import normalise, percentiles


@pytest.fixture(scope="module")
def pack():
    return load_script("gpu_pack_data")


def bright_tailed(seed=0):
    """uint16 haze with a few objects far above the 99.5th percentile (a light-sheet patch's shape)."""
    rng = np.random.default_rng(seed)
    image = rng.gamma(4.0, 100.0, size=(20, 40, 40))
    image[5:8, 10:14, 10:14] = 20000 + rng.normal(0, 2000, size=(3, 4, 4))
    return np.clip(image, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("upper_tail", ["clip", "log"])
def test_the_packed_copy_normalises_as_the_original(pack, upper_tail):
    image = bright_tailed()
    stored, record = pack.as_stored(image, 0.5, 99.5, upper_tail)
    assert stored.dtype == (np.uint8 if upper_tail == "clip" else np.uint16)
    lo, hi = percentiles(image)
    expected = normalise(image, lo, hi, upper_tail=upper_tail)
    got = normalise(stored, *percentiles(stored), upper_tail=upper_tail)
    # Half a step of 255 over the percentile range, plus the copy's own percentiles being rounded
    error = float(np.abs(got - expected).max())
    assert error <= 1 / 400
    assert record["quantised"] and record["max_normalised_error"] == pytest.approx(error, abs=1e-6)


def test_the_log_tail_survives_packing(pack):
    image = bright_tailed()
    stored, _ = pack.as_stored(image, 0.5, 99.5, "log")
    got = normalise(stored, *percentiles(stored), upper_tail="log")
    # The objects (~50x the upper percentile) stay far above the haze's ceiling of 1.
    assert got[5:8, 10:14, 10:14].min() > 3.0
    assert got.max() > 1 + np.log(20.0)


def test_uint8_images_are_packed_as_they_are(pack):
    image = (bright_tailed() // 256).astype(np.uint8)
    for upper_tail in ("clip", "log"):
        stored, record = pack.as_stored(image, 0.5, 99.5, upper_tail)
        assert stored is image and not record["quantised"]
