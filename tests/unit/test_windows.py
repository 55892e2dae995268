import numpy as np
import pytest
import torch

from lsmseg.windows import axis_starts, blend_weights, pad_widths, window_starts


@pytest.mark.parametrize("size,roi,overlap", [(64, 32, 0.5), (70, 32, 0.5), (33, 32, 0.25), (32, 32, 0.5), (100, 64, 0.625)])
def test_window_grid_matches_monai(size, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    shape, rois = (size, size + 7, 40), (roi, roi, 32)
    interval = _get_scan_interval(shape, rois, 3, (overlap,) * 3)
    expected = [tuple(s.start for s in sl) for sl in dense_patch_slices(shape, rois, interval)]
    assert window_starts(shape, rois, overlap) == expected


def test_windows_cover_every_voxel():
    starts = axis_starts(100, 32, 0.5)
    covered = np.zeros(100, bool)
    for s in starts:
        covered[s : s + 32] = True
    assert covered.all() and starts[-1] == 100 - 32


def test_pad_widths_symmetric_and_none_when_large_enough():
    assert pad_widths((10, 64, 70), (32, 32, 32)) == ((11, 11), (0, 0), (0, 0))
    assert pad_widths((31, 32, 33), (32, 32, 32)) == ((0, 1), (0, 0), (0, 0))


def test_blend_weights_gaussian_peak_in_centre():
    w = blend_weights((32, 32, 32))
    assert w.shape == (32, 32, 32) and float(w.min()) > 0
    assert torch.argmax(w).item() == np.ravel_multi_index((15, 15, 15), (32, 32, 32)) or float(w[16, 16, 16]) == float(w.max())
    assert float(w[0, 0, 0]) < 0.01 * float(w.max())


@pytest.mark.parametrize("size,window,halo", [(512, 128, 16), (512, 192, 16), (100, 64, 16), (64, 64, 8), (97, 32, 31), (1000, 96, 0)])
def test_voxel_overlap_grid_covers_the_axis_with_at_least_the_halo(size, window, halo):
    from lsmseg.windows import spread_starts

    starts = spread_starts(size, window, halo)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == size - window
    overlaps = [a + window - b for a, b in zip(starts, starts[1:])]
    assert all(o >= halo for o in overlaps)
    # The fewest windows: one window fewer could not keep the halo everywhere.
    assert len(starts) == 1 or (len(starts) - 2) * (window - halo) + window < size


def test_inference_window_clamped_to_the_volume_and_never_below_the_roi():
    from lsmseg.windows import inference_window

    roi = (32, 64, 64)
    assert inference_window((25, 512, 512), roi, (64, 128, 128)) == (32, 128, 128)
    assert inference_window((100, 100, 100), roi, (64, 192, 192)) == (64, 128, 128)
    assert inference_window((10, 20, 20), roi, (64, 128, 128)) == (32, 64, 64)
    assert inference_window((300, 300, 300), roi, None) == roi
