"""The predict flags for large volumes, as a user runs them."""

import json

import numpy as np
import pytest

from lsmseg import io
from lsmseg.cli import select_part

from ..conftest import make_weights
from ..conftest import run_lsmseg as lsmseg



@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_config, tiny_model):
    return make_weights(tmp_path_factory.mktemp("w"), tiny_model_config, tiny_model)


def test_select_part_is_an_interleaved_partition():
    items = list(range(7))
    shares = [select_part(items, (k, 3)) for k in (1, 2, 3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


def test_part_zarr_output_block_size_and_no_skip(tmp_path, weights):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        io.write_volume(rng.integers(0, 999, (12, 40, 48)).astype(np.uint16), tmp_path / "in" / f"{name}.tif")
    result = lsmseg("predict", tmp_path / "in", "-o", tmp_path / "out", "--weights", weights, "--part", "2/2",
                    "--output-format", "zarr", "--block-size", "8,40,24", "--no-skip-background", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.ome.zarr", "b.ome.zarr.provenance.json"]
    mask = io.read_volume(tmp_path / "out" / "b.ome.zarr")
    assert mask.shape == (12, 40, 48) and set(np.unique(mask.load())) <= {0, 1}
    provenance = json.loads((tmp_path / "out" / "b.ome.zarr.provenance.json").read_text())
    assert provenance["blocks"]["blocks"] == 2 * 1 * 2 and provenance["blocks"]["block_size"] == [8, 40, 24]
    assert provenance["blocks"]["background"] is None and provenance["blocks"]["windows_skipped"] == 0


@pytest.mark.parametrize("bad", ["0/2", "3/2", "x"])
def test_bad_part_is_a_usage_error(tmp_path, bad):
    result = lsmseg("predict", tmp_path, "-o", tmp_path / "out", "--part", bad)
    assert result.returncode == 2 and "--part" in result.stderr
