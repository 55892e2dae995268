"""Blocks spread over a 2-worker dask LocalCluster give the single-process mask."""

import json

import numpy as np
import pytest
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, predict_files

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 3, padding=1)
    ).eval()


def test_two_worker_cluster_matches_single_process(conv_model, tiny_model_config, tmp_path):
    from lsmseg.distributed import predict_files_dask

    rng = np.random.default_rng(0)
    volume = rng.integers(100, 3000, (40, 96, 160)).astype(np.uint16)
    volume[:, :, :100] = rng.integers(95, 105, (40, 96, 100))  # dark: some windows are skipped
    io.write_volume(volume, tmp_path / "in" / "v.tif", spacing=(2.0, 1.0, 1.0))
    (tmp_path / "in" / "broken.tif").write_bytes(b"II*\x00garbage")
    # An intensity floor too: each worker reads its block's input again to apply it.
    settings = InferenceSettings(overlap=0.5, threshold=0.45, intensity_floor=0.3)
    predictor = Predictor(conv_model, tiny_model_config, settings, device="cpu",
                          options=RunOptions(progress=False, block_size=(16, 48, 64)))
    inputs = [tmp_path / "in" / "broken.tif", tmp_path / "in" / "v.tif"]
    single = predict_files(predictor, inputs[1:], tmp_path / "single")
    expected = io.read_volume(tmp_path / "single" / "v.tif").load()
    assert 0 < expected.mean() < 1

    results = predict_files_dask(predictor, inputs, tmp_path / "dask", n_workers=2, processes=False)
    assert [r.ok for r in results] == [False, True] and "broken.tif" in results[0].error
    written = io.read_volume(tmp_path / "dask" / "v.tif")
    np.testing.assert_array_equal(written.load(), expected)
    np.testing.assert_allclose(written.spacing, (2.0, 1.0, 1.0), rtol=1e-5)
    provenance = json.loads((tmp_path / "dask" / "v.tif.provenance.json").read_text())
    assert provenance["blocks"]["scheduler"] == "dask" and provenance["blocks"]["workers"] == 2
    assert provenance["blocks"]["windows_skipped"] == single[0].record["blocks"]["windows_skipped"] > 0
    # Workers keep no window cache: a window on a block border runs in every block it touches.
    one_process = single[0].record["blocks"]
    assert one_process["windows_reused"] > 0 and provenance["blocks"]["windows_reused"] == 0
    assert provenance["blocks"]["window_runs"] == one_process["window_runs"] + one_process["windows_reused"]
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == ["v.tif", "v.tif.provenance.json"]

    results = predict_files_dask(predictor, inputs[1:], tmp_path / "zarr", output_format="zarr", n_workers=2,
                                 processes=False)
    np.testing.assert_array_equal(io.read_volume(tmp_path / "zarr" / "v.ome.zarr").load(), expected)
