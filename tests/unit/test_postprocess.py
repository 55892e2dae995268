import itertools

import numpy as np
import pytest

from lsmseg.config import InferenceSettings
from lsmseg.inference.postprocess import open_faces_of, remove_small_components


def scene() -> np.ndarray:
    """A long tube (kept), a 2x2x2 speckle (8 voxels) and a 3x3x3 blob (27 voxels), all 26-separated."""
    mask = np.zeros((20, 40, 40), np.uint8)
    mask[10, 20, :] = 1  # 40 voxels
    mask[3:5, 3:5, 3:5] = 1
    mask[14:17, 30:33, 5:8] = 1
    return mask


def test_small_components_removed_large_kept():
    mask = scene()
    out = remove_small_components(mask, 10)
    assert out[3:5, 3:5, 3:5].sum() == 0  # 8 < 10 voxels
    assert out[14:17, 30:33, 5:8].all() and out[10, 20, :].all()
    assert out.sum() == 40 + 27 and mask.sum() == 40 + 27 + 8  # input untouched
    assert remove_small_components(mask, 30).sum() == 40
    assert remove_small_components(mask, 0) is mask  # 0: keep everything


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((6, 6, 6), np.uint8)
    for i in range(5):
        mask[i, i, i] = 1  # a 26-connected diagonal of 5 voxels
    assert remove_small_components(mask, 5).sum() == 5
    assert remove_small_components(mask, 6).sum() == 0


def test_mask_value_is_kept():
    mask = scene() * np.uint8(255)
    out = remove_small_components(mask, 10)
    assert set(np.unique(out)) == {0, 255} and out.dtype == np.uint8


def test_component_on_an_open_face_is_kept():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[4:6, 4:6, 8:10] = 1  # 8 voxels touching the x+ face
    assert remove_small_components(mask, 10).sum() == 0  # the face is the volume's edge
    kept = remove_small_components(mask, 10, open_faces=(False, False, False, False, False, True))
    assert kept.sum() == 8  # the block continues beyond x+: the component may be larger there
    other_face = remove_small_components(mask, 10, open_faces=(True, False, False, False, False, False))
    assert other_face.sum() == 0


def test_open_faces_of_a_block():
    shape = (20, 40, 40)
    assert open_faces_of((slice(0, 20), slice(0, 40), slice(0, 40)), shape) == (False,) * 6
    assert open_faces_of((slice(0, 10), slice(20, 40), slice(10, 30)), shape) == (False, True, True, False, True, True)


def test_block_wise_cleaning_matches_whole_volume_when_no_speckle_is_cut():
    mask = scene()
    whole = remove_small_components(mask, 10)
    split = np.zeros_like(mask)
    edges = [(0, 10, 20), (0, 20, 40), (0, 20, 40)]  # cuts the tube, not the speckle or the blob
    for (z0, z1), (y0, y1), (x0, x1) in itertools.product(*[list(zip(e[:-1], e[1:])) for e in edges]):
        out = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        split[out] = remove_small_components(mask[out], 10, open_faces_of(out, mask.shape))
    np.testing.assert_array_equal(split, whole)


def test_setting_is_validated():
    with pytest.raises(ValueError, match="min_component_voxels"):
        InferenceSettings(min_component_voxels=-1)
