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


def test_percentiles_of_sparse_bright_objects_on_zero_keep_their_contrast():
    # Background-subtracted data: over 99.5 % exact zeros, so both percentiles are 0; the range
    # falls back to the sample's own, or the objects would be normalised away (all-zero input).
    volume = np.zeros((32, 96, 96), np.uint16)
    volume[10:13, 40:43, 50:53] = 3000
    lo, hi = percentiles(volume)
    assert (lo, hi) == (0.0, 3000.0)
    assert normalise(volume, lo, hi)[11, 41, 51] == 1.0
    saturated = np.full((32, 96, 96), 65535, np.uint16)
    saturated[5, 5, 5] = 100
    assert percentiles(saturated) == (100.0, 65535.0)
    assert percentiles(np.full((4, 4, 4), 7, np.uint16)) == (7.0, 7.0)  # constant: still no contrast


def test_boolean_volumes_are_intensities_zero_and_one():
    volume = np.zeros((8, 40, 40), bool)
    volume[:, :20] = True
    assert percentiles(volume) == (0.0, 1.0)
    assert normalise_volume(volume).sum() == volume.sum()


@pytest.mark.parametrize("scale, dtype", [(1e300, np.float64), (1e-300, np.float64), (1e-43, np.float32)])
def test_ranges_beyond_float32_normalise_to_finite_values(scale, dtype):
    # The normalised values are small, but the raw ones or 1 / (hi - lo) overflow float32.
    volume = (np.random.default_rng(0).gamma(2.0, 300.0, (8, 40, 40)) * scale).astype(dtype)
    for tail in ("clip", "log"):
        out = normalise_volume(volume, upper_tail=tail)
        assert np.isfinite(out).all() and out.max() >= 1.0 and out.min() == 0.0


def test_one_voxel_beyond_float32_is_bright_not_infinite():
    volume = np.random.default_rng(0).gamma(2.0, 300.0, (8, 40, 40))
    volume[1, 2, 3] = 1e39
    out = normalise_volume(volume, upper_tail="log")
    assert np.isfinite(out).all() and out[1, 2, 3] == out.max() > 60


def test_subsample_of_a_long_line_ends():
    # Subsampling y and x cannot shrink a line of 1 x 1 planes: z must be strided instead.
    line = np.broadcast_to(np.zeros((1, 1, 1), np.uint16), (2001, 1, 1))
    assert 0 < subsample(line, max_samples=1000).size <= 2000
