import numpy as np
import pytest

from lsmseg.normalise import normalise, normalise_volume, percentiles, subsample


def test_normalise_clips_to_unit_range():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 4000, size=(20, 30, 30)).astype(np.uint16)
    out = normalise_volume(volume, 1, 99)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(volume, [1, 99])
    inside = (volume > lo) & (volume < hi)
    np.testing.assert_allclose(out[inside], (volume[inside] - lo) / (hi - lo), rtol=1e-5)


def test_constant_volume_maps_to_zero():
    assert not normalise(np.full((4, 4, 4), 7, np.uint16), 7.0, 7.0).any()


def test_percentiles_subsampled_close_to_exact():
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 100.0, size=(64, 256, 256)).astype(np.float32)
    lo, hi = percentiles(volume, 0.5, 99.5, max_samples=200_000)
    exact_lo, exact_hi = np.percentile(volume, [0.5, 99.5])
    assert abs(lo - exact_lo) / exact_lo < 0.1 and abs(hi - exact_hi) / exact_hi < 0.05
    assert subsample(volume, 200_000).size <= 400_000


def test_percentiles_ignore_nan_and_reject_bad_bounds():
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    volume[0, 0, 0] = np.nan
    lo, hi = percentiles(volume, 0, 100)
    assert (lo, hi) == (1.0, 999.0)
    with pytest.raises(ValueError):
        percentiles(volume, 50, 10)


def test_subsample_reads_lazy_arrays_by_plane():
    class Lazy:
        shape, dtype = (40, 100, 100), np.dtype(np.uint16)

        def __init__(self):
            self.reads = 0

        def __getitem__(self, key):
            self.reads += 1
            return np.ones((100, 100), np.uint16)[key[1:]]

    lazy = Lazy()
    sample = subsample(lazy, 10_000)
    assert sample.ndim == 3 and lazy.reads == sample.shape[0] < 40


def test_log_upper_tail_keeps_order_above_the_upper_percentile():
    values = np.array([-5, 0, 5, 10, 20, 100, 1000], np.float32)
    clipped, logged = normalise(values, 0.0, 10.0), normalise(values, 0.0, 10.0, "log")
    np.testing.assert_array_equal(logged[:4], clipped[:4])  # up to hi: the same [0, 1] mapping
    np.testing.assert_allclose(logged[4:], 1.0 + np.log([2.0, 10.0, 100.0]), rtol=1e-6)
    assert clipped[4:].tolist() == [1.0, 1.0, 1.0]  # clip: the bright tail is one plateau
    assert np.all(np.diff(logged[1:]) > 0)
    # continuous at hi
    assert normalise(np.float32([10.001]), 0.0, 10.0, "log")[0] == pytest.approx(1.0, abs=1e-3)


def test_unknown_upper_tail_is_refused():
    with pytest.raises(ValueError, match="upper_tail"):
        normalise(np.ones(3), 0.0, 1.0, "sqrt")
    from lsmseg.config import InferenceSettings

    with pytest.raises(ValueError, match="upper_tail"):
        InferenceSettings(upper_tail="sqrt")
