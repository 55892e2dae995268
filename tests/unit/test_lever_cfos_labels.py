"""scripts/lever_cfos_labels.py: how each c-Fos patch is labelled (objects, share, brightness)."""

import numpy as np
import pytest

from ..conftest import load_script
from lsmseg.io import write_volume


def test_patch_table_tells_dense_dim_labels_from_sparse_bright_ones(tmp_path, monkeypatch):
    folder = tmp_path / "delivr" / "cfos"
    rng = np.random.default_rng(0)
    image = rng.integers(90, 110, (20, 40, 40)).astype(np.uint16)
    sparse = np.zeros(image.shape, np.uint8)
    sparse[5:7, 10:13, 10:13] = 1  # one bright object of 18 voxels
    sparse[12:14, 30:33, 30:33] = 1  # and a second
    bright = image.copy()
    bright[sparse == 1] = 5000
    dense = np.zeros(image.shape, np.uint8)
    dense[::4, ::4, ::4] = 1  # 2000 one-voxel objects on the background
    write_volume(bright, folder / "images" / "patchvolume_1111_0.tif")
    write_volume(sparse, folder / "labels" / "patchvolume_1111_0.tif")
    write_volume(image, folder / "images" / "patchvolume_1111_1.tif")
    write_volume(dense, folder / "labels" / "patchvolume_1111_1.tif")
    write_volume(image, folder / "images" / "patchvolume_1111_2.tif")
    write_volume(np.zeros(image.shape, np.uint8), folder / "labels" / "patchvolume_1111_2.tif")  # empty: skipped
    write_volume(bright, folder / "images" / "patchvolume_2222_0.tif")
    write_volume(sparse, folder / "labels" / "patchvolume_2222_0.tif")  # another source: not asked for
    monkeypatch.setenv("LSMSEG_DATA", str(tmp_path))

    table = load_script("lever_cfos_labels").patches(("1111",))
    assert set(table) == {"patchvolume_1111_0", "patchvolume_1111_1"}
    sparse_row, dense_row = table["patchvolume_1111_0"], table["patchvolume_1111_1"]
    assert sparse_row["objects"] == 2 and sparse_row["median_object_voxels"] == 18
    assert sparse_row["labelled_percent"] == pytest.approx(36 / 32000 * 100, abs=1e-3)
    assert dense_row["objects"] == 5 * 10 * 10 and dense_row["median_object_voxels"] == 1
    # Bright labels sit far above the patch's median; labels on the background do not.
    assert sparse_row["label_p50"] > 1.0 > sparse_row["patch_p50"]
    assert dense_row["label_p50"] == pytest.approx(dense_row["patch_p50"], abs=0.2)
