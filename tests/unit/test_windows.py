import numpy as np
import pytest
import torch

from lsmseg.inference.windows import axis_starts, blend_weights, pad_widths, window_starts


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
