"""scripts/lever_intensity_floor.py: where labelled voxels sit in the normalised intensity, per brain."""

import numpy as np
import pytest

from ..conftest import load_script
from lsmseg.io import write_volume


def test_labels_table_reads_each_brains_label_brightness(tmp_path, monkeypatch):
    folder = tmp_path / "delivr" / "microglia"
    rng = np.random.default_rng(0)
    for brain, bright in (("1111", 3000), ("2222", 30000)):
        image = rng.integers(90, 110, (20, 40, 40)).astype(np.uint16)
        label = np.zeros(image.shape, np.uint8)
        label[5:8, 10:14, 10:14] = 1  # 48 voxels of 32000: 0.15 %, above the 99.5th percentile
        image[label == 1] = bright
        write_volume(image, folder / "images" / f"patchvolume_{brain}_0.tif")
        write_volume(label, folder / "labels" / f"patchvolume_{brain}_0.tif")
    write_volume(np.zeros((20, 40, 40), np.uint8), folder / "labels" / "patchvolume_2222_1.tif")  # empty: skipped
    write_volume(np.ones((20, 40, 40), np.uint16), folder / "images" / "patchvolume_2222_1.tif")
    monkeypatch.setenv("LSMSEG_DATA", str(tmp_path))

    table = load_script("lever_intensity_floor").labels()
    assert set(table) == {"1111", "2222"} and table["2222"]["patches_with_labels"] == 1
    for row in table.values():
        assert row["labelled_fraction"] == pytest.approx(48 / 32000, abs=1e-4)
        assert row["labelled_share_of_as_bright"] == 1.0
    # Brighter labels sit further above the 99.5th percentile (1.0) in normalised units (log tail).
    assert 1.0 < table["1111"]["label_p50"] < table["2222"]["label_p50"]
