"""`lsmseg predict` on volumes with a length-1 axis, or thinner than the model's window in one axis:
each gets a mask of its own shape and spacing in its own container; a bad file among them is one
error line and the others are still segmented."""

import numpy as np
import pytest
import tifffile

from lsmseg import io

from ..conftest import make_weights
from ..conftest import run_lsmseg as lsmseg

SPACING = (2.0, 1.0, 1.0)
# The tiny model's window is 32 x 64 x 64.
SHAPES = {"plane": (1, 40, 50), "row": (12, 1, 50), "column": (12, 40, 1), "voxel": (1, 1, 1),
          "thin_z": (3, 80, 80), "thin_y": (20, 2, 90)}
SUFFIXES = (".tif", ".ome.tif", ".nii.gz", ".ome.zarr", "_planes")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_config, tiny_model):
    return make_weights(tmp_path_factory.mktemp("w"), tiny_model_config, tiny_model)


def test_predict_writes_masks_of_thin_volumes_in_their_own_container(tmp_path, weights):
    inputs, rng = tmp_path / "in", np.random.default_rng(0)
    expected = {}
    for name, shape in SHAPES.items():
        volume = rng.gamma(2.0, 300.0, shape).astype(np.uint16)
        for suffix in SUFFIXES:
            expected[name + suffix] = shape
            io.write_volume(volume, inputs / (name + suffix), spacing=SPACING)
    # A stack of one-voxel-wide planes as another program writes it (no shape metadata).
    for plane in rng.gamma(2.0, 300.0, (10, 30, 1)).astype(np.uint16):
        tifffile.imwrite(inputs / "other.tif", plane, append=True, photometric="minisblack", metadata=None)
    expected["other.tif"] = (10, 30, 1)
    (inputs / "broken.tif").write_bytes(b"II*\x00not really a tiff")

    result = lsmseg("predict", inputs, "-o", tmp_path / "out", "--weights", weights, "--device", "cpu", "-q")
    assert result.returncode == 1, result.stderr  # broken.tif
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "broken.tif" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    for name, shape in expected.items():
        mask = io.read_volume(tmp_path / "out" / name)
        assert mask.shape == shape and mask.dtype == np.uint8, name
        if name != "other.tif":
            np.testing.assert_allclose(mask.spacing, SPACING, rtol=1e-5, err_msg=name)
