"""A volume that must be resampled is predicted in memory: one that would not fit is refused before
it is read, with the way to predict it block by block, and the other volumes still run."""

import dataclasses
import logging

import numpy as np
import pytest

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, predict_files
from lsmseg.inference import run as run_module


def _predictor(tiny_model, tiny_model_config, settings, **options):
    return Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch",
                     options=RunOptions(progress=False, **options))


def _write(folder, name, spacing=(1.0, 1.0, 1.0)):
    volume = np.random.default_rng(0).gamma(2.0, 300.0, (12, 40, 40)).astype(np.uint16)
    io.write_volume(volume, folder / name, spacing=spacing)
    return folder / name


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


SCALED = InferenceSettings(threshold=0.5, per_structure={"cfos_neuron": {"input_scale": 1.5}})
RESAMPLED = InferenceSettings(threshold=0.5, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("settings, spacing, way_out", [
    (SCALED, (1.0, 1.0, 1.0), "--input-scale 1 predicts it on its own grid, block by block"),
    (RESAMPLED, (2.0, 1.0, 1.0), "--no-resample predicts it on its own grid, block by block"),
])
def test_a_resampled_volume_that_does_not_fit_in_memory_is_refused_and_the_others_run(
        tiny_model, tiny_model_config, tmp_path, monkeypatch, caplog, settings, spacing, way_out):
    monkeypatch.setattr(run_module, "available_memory", lambda: 2**10)  # 1 KiB: far below any volume's need
    big = _write(tmp_path / "in", "cfos_neuron_1.tif", spacing)
    own_grid = _write(tmp_path / "in", "microglia_1.tif")  # the model's spacing, no input_scale: block by block
    results = predict_files(_predictor(tiny_model, tiny_model_config, settings), [big, own_grid], tmp_path / "out")
    assert [r.ok for r in results] == [False, True]
    error = results[0].error
    need = run_module.resampled_peak_bytes(shape=(12, 40, 40), grid=[18, 60, 60] if settings is SCALED else [24, 40, 40],
                                           itemsize=2)
    assert error.startswith(str(big)) and "\n" not in error
    assert f"about {need / 2**30:.1f} GB, but 0.0 GB is available" in error and error.endswith(way_out)
    assert _errors(caplog) == [error]
    assert not (tmp_path / "out" / "cfos_neuron_1.tif").exists()
    assert io.read_volume(tmp_path / "out" / "microglia_1.tif").shape == (12, 40, 40)


def test_unknown_available_memory_refuses_nothing(tiny_model, tiny_model_config, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "available_memory", lambda: None)
    big = _write(tmp_path / "in", "cfos_neuron_1.tif")
    [result] = predict_files(_predictor(tiny_model, tiny_model_config, SCALED), [big], tmp_path / "out")
    assert result.ok and result.record["postprocess"]["input_scale"] == 1.5


def test_the_voxel_cap_on_a_resampled_volume_names_the_way_out(tiny_model, tiny_model_config, tmp_path):
    # 12 x 40 x 40 = 19,200 voxels under the cap; its 18 x 60 x 60 grid = 64,800 above it.
    big = _write(tmp_path / "in", "cfos_neuron_1.tif", (2.0, 1.0, 1.0))
    predictor = _predictor(tiny_model, tiny_model_config, SCALED, max_voxels=30_000)
    [result] = predict_files(predictor, [big], tmp_path / "out")
    assert "above the limit of 30,000" in result.error
    assert "--input-scale 1 predicts it on its own grid, block by block" in result.error
    both = _predictor(tiny_model, tiny_model_config, dataclasses.replace(SCALED, spacing=(1.0, 1.0, 1.0)),
                      max_voxels=30_000)
    [result] = predict_files(both, [big], tmp_path / "out")
    assert "--input-scale 1 --no-resample predicts it on its own grid, block by block" in result.error
