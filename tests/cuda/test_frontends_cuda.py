"""The front ends on CUDA: dask with one GPU worker, and the container's exec mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, predict_files

from ..conftest import run_lsmseg

pytestmark = pytest.mark.cuda


def test_dask_with_one_gpu_worker(gpu, sample_volumes, tmp_path, tiny_model_config):
    """One worker process placed on the GPU writes the single-process mask."""
    pytest.importorskip("distributed")
    from lsmseg.distributed import predict_files_dask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.Conv3d(8, 1, 3, padding=1)).eval()
    image = gpu.crop(io.read_volume(sample_volumes[0][0]).load(), (32, 96, 96))
    path = io.write_volume(image, tmp_path / "in" / "vessels.tif", spacing=(2.0, 1.0, 1.0))
    predictor = Predictor(model, tiny_model_config, InferenceSettings(overlap=0.5), device=gpu.device,
                          engine="torch", options=RunOptions(progress=False, block_size=(16, 64, 64)))
    [single] = predict_files(predictor, [path], tmp_path / "single")
    # A worker process on the GPU; threads on the stand-in (a spawned worker costs the CPU half a minute).
    [spread] = predict_files_dask(predictor, [path], tmp_path / "dask", n_workers=1, processes=not gpu.stand_in)
    expected = io.read_volume(tmp_path / "single" / "vessels.tif").load()
    written = io.read_volume(tmp_path / "dask" / "vessels.tif").load()
    record = json.loads((tmp_path / "dask" / "vessels.tif.provenance.json").read_text())
    gpu.report("dask_one_gpu_worker", shape=image.shape, blocks=record["blocks"]["blocks"],
               device=record["parameters"]["device"], mask_differences=int(np.count_nonzero(written != expected)))
    assert single.ok and spread.ok, spread.error
    assert record["blocks"]["scheduler"] == "dask" and record["blocks"]["workers"] == 1
    assert record["parameters"]["device"].startswith(gpu.device.type)
    np.testing.assert_array_equal(written, expected)


def test_challenge_exec_mode(gpu, sample_volumes, tmp_path):
    """`lsmseg challenge --mode exec` on the device: output.mha of the input's shape, provenance naming the device."""
    pytest.importorskip("SimpleITK", reason="exec mode writes output.mha with SimpleITK")
    from lsmseg.challenge.settings import DEFAULT_INPUT_SLUG, DEFAULT_OUTPUT_SLUG

    image = gpu.crop(io.read_volume(sample_volumes[0][0]).load(), (32, 64, 64))  # the shipped window: one window on the stand-in
    case = tmp_path / "in" / "images" / DEFAULT_INPUT_SLUG
    io.write_volume(image, case / "blood_vessel_case.tif", spacing=(2.0, 1.0, 1.0))
    result = run_lsmseg("-q", "challenge", "--mode", "exec", "--input", tmp_path / "in", "--output", tmp_path / "out",
                        "--device", gpu.device.type, "--engine", "torch",
                        env={"LSMSEG_PROVENANCE_DIR": str(tmp_path / "provenance")})
    assert result.returncode == 0, result.stderr[-3000:]
    mask = io.read_volume(tmp_path / "out" / "images" / DEFAULT_OUTPUT_SLUG / "output.mha").load()
    record = json.loads((tmp_path / "provenance" / "output.mha.provenance.json").read_text())
    gpu.report("challenge_exec", shape=image.shape, device=record["parameters"]["device"],
               engine=record["parameters"]["engine"], foreground=int(np.count_nonzero(mask)))
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1}
    assert record["parameters"]["device"].startswith(gpu.device.type)
    shutil.rmtree(tmp_path / "in")
