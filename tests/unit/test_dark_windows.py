"""Dark-window skipping on small, dim objects in a dark field, and its edge cases (no network run)."""

import numpy as np
import pytest

from lsmseg.inference.foreground import dark_windows, estimate_background
from lsmseg.normalise import normalise, percentiles, subsample

ROI = (32, 64, 64)


def _blob(shape, centre, sigma):
    axes = [np.exp(-0.5 * ((np.arange(n) - c) / s) ** 2) for n, c, s in zip(shape, centre, sigma)]
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def _mostly_dark(shape=(64, 128, 128), seed=0):
    """A dark field at the level and noise of DELiVR's microglia background (raw ~197 +- 12), with
    tissue in one corner (an eighth of the patch), as in a mostly dark challenge patch."""
    rng = np.random.default_rng(seed)
    image = rng.normal(197, 12, shape)
    z, y, x = (n // 2 for n in shape)
    image[:z, :y, :x] = rng.normal(800, 150, (z, y, x))  # its tissue: hi ~1100 as there
    return image


def _windows_holding(image, centre):
    lo, hi = percentiles(image)
    region = normalise(image, lo, hi, "log")
    background = estimate_background(subsample(region))
    assert background is not None
    corners = [(z, y, x) for z in range(0, image.shape[0] - ROI[0] + 1, 16)
               for y in range(0, image.shape[1] - ROI[1] + 1, 32) for x in range(0, image.shape[2] - ROI[2] + 1, 32)]
    flags = dark_windows(region, (0, 0, 0), corners, ROI, background)
    holding = [all(c + 3 <= p < c + r - 3 for c, p, r in zip(corner, centre, ROI)) for corner in corners]
    return [flag for flag, held in zip(flags, holding) if held], flags


@pytest.mark.parametrize("offset", [0.0, 1.5, 2.5])
def test_a_small_cell_in_a_dark_field_is_never_skipped_wherever_it_sits_on_the_cell_grid(offset):
    """A ~30-voxel cell whose peak is 9x the dark level (c-Fos cells in DELiVR are ~15x) was skipped
    when its centre sat on a 4^3 cell border: split over 8 cells it stayed under the ceiling."""
    image = _mostly_dark()
    centre = tuple(c + offset for c in (46, 94, 94))  # 1.5: on a 4^3 cell border (48, 96)
    image += 8 * 197 * _blob(image.shape, centre, (1.0, 2.0, 2.0))
    held, _ = _windows_holding(np.round(image).astype(np.uint16), centre)
    assert held and not any(held), held


def test_the_dark_field_itself_is_still_skipped():
    _, flags = _windows_holding(np.round(_mostly_dark()).astype(np.uint16), (0, 0, 0))
    assert sum(flags) >= 0.4 * len(flags), (sum(flags), len(flags))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (1, 64, 64), (2, 3, 200)])
def test_tiny_and_thin_volumes_give_no_error(shape):
    image = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    lo, hi = percentiles(image)
    region = normalise(image, lo, hi, "log")
    assert np.isfinite(region).all()
    background = estimate_background(subsample(region))
    if background is not None:
        padded = np.zeros([max(a, b) for a, b in zip(shape, ROI)], np.float32)
        padded[: shape[0], : shape[1], : shape[2]] = region
        assert len(dark_windows(padded, (0, 0, 0), [(0, 0, 0)], ROI, background)) == 1


def test_one_hot_pixel_does_not_set_the_scale_of_sparse_data_on_zero():
    """Background-subtracted data (over 99.5 % exact zeros) with one saturated voxel: the scale
    comes from the sparse tissue's own percentiles, not from the hot pixel."""
    rng = np.random.default_rng(0)
    volume = np.zeros((100, 100, 100), np.uint16)
    tissue = rng.choice(volume.size, 4000, replace=False)
    volume.flat[tissue] = rng.integers(100, 1000, tissue.size)
    volume[0, 0, 0] = 65535
    lo, hi = percentiles(volume)
    assert lo == 0.0 and 900 <= hi <= 1000, (lo, hi)
    assert normalise(volume, lo, hi).flat[tissue].max() == 1.0
