import dataclasses
import json
import re

import numpy as np
import pytest
import tifffile
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.errors import ConfigError, InputError
from lsmseg.inference import Predictor, RunOptions, predict_file, predict_files
from lsmseg.normalise import normalise_volume


@pytest.fixture
def predictor(tiny_model, tiny_model_config):
    # The training ROI and a fractional overlap: MONAI's grid, so that results can be compared with it.
    return Predictor(tiny_model, tiny_model_config, InferenceSettings(overlap=0.5), device="cpu", engine="torch",
                     options=RunOptions(progress=False))


def test_sliding_window_matches_monai(predictor, tiny_model):
    from monai.inferers import sliding_window_inference

    rng = np.random.default_rng(0)
    image = rng.random((40, 70, 80), dtype=np.float32)
    ours = predictor.sliding_window_logits(image)
    with torch.inference_mode():
        theirs = sliding_window_inference(
            torch.from_numpy(image)[None, None], (32, 64, 64), 4, tiny_model, overlap=0.5, mode="gaussian"
        )[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_small_volume_is_padded_not_rejected(predictor):
    volume = np.random.default_rng(1).integers(0, 255, (10, 40, 20)).astype(np.uint8)
    mask = predictor.predict_volume(volume)
    assert mask.shape == volume.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


def test_threshold_applies_to_blended_probability(predictor):
    volume = np.random.default_rng(2).random((32, 64, 64)).astype(np.float32)
    probability = torch.sigmoid(torch.from_numpy(predictor.predict_logits(volume))).numpy()
    for threshold in (0.3, 0.5, 0.7):
        predictor.settings.threshold = threshold
        np.testing.assert_array_equal(predictor.predict_volume(volume), (probability >= threshold).astype(np.uint8))


def test_resampling_to_model_spacing_returns_input_grid(tiny_model, tiny_model_config):
    settings = InferenceSettings(spacing=(1.0, 1.0, 1.0))
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", options=RunOptions(progress=False))
    volume = np.random.default_rng(3).random((12, 64, 64)).astype(np.float32)
    assert predictor.predict_volume(volume, spacing=(4.0, 1.0, 1.0)).shape == volume.shape
    # The window grid tells which grid the network ran on: z of 48 (4x to the model's 1 um) takes two
    # windows of 32 at overlap 0.5; z of 12 is padded to one.
    logits, stats = predictor.logits_with_stats(volume, spacing=(4.0, 1.0, 1.0))
    assert logits.shape == volume.shape and stats.windows == 2
    assert predictor.logits_with_stats(volume, spacing=(1.1, 1.0, 1.0))[1].windows == 1  # within tolerance
    predictor.options = dataclasses.replace(predictor.options, resample=False)
    assert predictor.logits_with_stats(volume, spacing=(4.0, 1.0, 1.0))[1].windows == 1


def test_constant_and_nan_volumes(predictor, caplog):
    assert not predictor.predict_volume(np.full((8, 16, 16), 300, np.uint16)).any()
    assert "constant intensity" in caplog.text
    bad = np.ones((8, 16, 16), np.float32)
    bad[0, 0, 0] = np.nan
    bad[1, 1, 1] = 1.0
    with pytest.raises(InputError, match="NaN/Inf"):
        predictor.predict_volume(bad, name="bad.tif")


@pytest.mark.parametrize("value", [False, True])
def test_constant_boolean_volumes_get_an_empty_mask(predictor, caplog, value):
    # As a constant uint8 volume: no network answer to a blank input (which marks voxels near its faces).
    assert not predictor.predict_volume(np.full((8, 96, 96), value)).any()
    assert "constant intensity" in caplog.text
    binary = np.zeros((8, 40, 40), bool)
    binary[:, :20] = True
    assert predictor.predict_volume(binary).shape == binary.shape


def test_a_constant_boolean_file_resampled_gets_an_empty_mask(tiny_model, tiny_model_config, tmp_path, caplog):
    # The resampling path checked "uif" dtypes only: a blank bool file ran through the network.
    settings = InferenceSettings(spacing=(1.0, 1.0, 1.0))
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", options=RunOptions(progress=False))
    io.write_volume(np.ones((6, 40, 40), bool), tmp_path / "blank.tif", spacing=(4.0, 1.0, 1.0))
    result = predict_file(predictor, tmp_path / "blank.tif", tmp_path / "out" / "blank.tif")
    assert result.ok and "constant intensity" in caplog.text
    assert not io.read_volume(tmp_path / "out" / "blank.tif").load().any()


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (-4.0, 1.0, 1.0), (float("nan"), 1.0, 1.0), (float("inf"), 1.0, 1.0)])
def test_spacing_that_is_no_voxel_size_is_refused(tiny_model, tiny_model_config, spacing):
    # 0 or negative: resampled to one plane and back, silently; NaN/Inf: a bare conversion error.
    settings = InferenceSettings(spacing=(1.0, 1.0, 1.0))
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", options=RunOptions(progress=False))
    with pytest.raises(ValueError, match="spacing .* positive and finite"):
        predictor.predict_volume(np.random.default_rng(3).random((12, 40, 40)).astype(np.float32), spacing=spacing)


def test_predict_files_keeps_going_and_writes_provenance(predictor, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = np.random.default_rng(4).integers(100, 4000, (12, 40, 40)).astype(np.uint16)
    io.write_volume(good, inputs / "a.tif", spacing=(3.0, 1.0, 1.0))
    io.write_volume(good, inputs / "b.nii.gz", spacing=(3.0, 1.0, 1.0))
    (inputs / "broken.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(inputs / "flat.tif", np.zeros((8, 8), np.uint16))
    results = predict_files(predictor, io.list_volumes(inputs), tmp_path / "out")
    ok = {r.input.split("/")[-1]: r.ok for r in results}
    assert ok == {"a.tif": True, "b.nii.gz": True, "broken.tif": False, "flat.tif": False}
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["a.tif", "a.tif.provenance.json", "b.nii.gz", "b.nii.gz.provenance.json"]
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert any("broken.tif" in e for e in errors) and any("2-D image" in e for e in errors)
    provenance = json.loads((tmp_path / "out" / "a.tif.provenance.json").read_text())
    assert provenance["shape"] == [12, 40, 40] and provenance["parameters"]["inference"]["overlap"] == 0.5
    assert provenance["spacing_um"] == [3.0, 1.0, 1.0] and "lsmseg" in provenance["versions"]
    mask = io.read_volume(tmp_path / "out" / "a.tif")
    assert mask.shape == good.shape and mask.dtype == np.uint8
    np.testing.assert_allclose(mask.spacing, (3.0, 1.0, 1.0), rtol=1e-5)


def test_mask_value_255(tiny_model, tiny_model_config, tmp_path):
    predictor = Predictor(tiny_model, tiny_model_config, InferenceSettings(threshold=0.01), device="cpu",
                          options=RunOptions(progress=False, mask_value=255))
    io.write_volume(np.random.default_rng(5).integers(0, 999, (8, 32, 32)).astype(np.uint16), tmp_path / "v.tif")
    predict_file(predictor, tmp_path / "v.tif", tmp_path / "out" / "v.tif")
    assert set(np.unique(io.read_volume(tmp_path / "out" / "v.tif").load())) <= {0, 255}


def test_normalisation_is_the_shared_one(predictor):
    volume = np.random.default_rng(6).integers(0, 5000, (32, 64, 64)).astype(np.uint16)
    np.testing.assert_allclose(
        predictor.predict_logits(volume), predictor.sliding_window_logits(normalise_volume(volume)), rtol=1e-6
    )


def test_intensity_floor_drops_dim_voxels_alike_in_memory_block_wise_and_resampled(tiny_model, tiny_model_config,
                                                                                  tmp_path):
    """A voxel below the floor (in normalised intensity, 1 = the 99.5th percentile) is never
    foreground: the same mask from arrays, from a file in several blocks, and resampled."""
    volume = np.random.default_rng(7).gamma(2.0, 300.0, (40, 70, 80)).astype(np.uint16)
    settings = InferenceSettings(threshold=0.3, per_structure={"microglia": {"intensity_floor": 0.6}})
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch",
                          options=RunOptions(progress=False, block_size=48))
    normalised = predictor.normalised(volume)
    probability = torch.sigmoid(torch.from_numpy(predictor.predict_logits(volume))).numpy()
    expected = ((probability >= 0.3) & (normalised >= 0.6)).astype(np.uint8)
    assert 0 < expected.sum() < (probability >= 0.3).sum()  # the floor removed some, not all
    np.testing.assert_array_equal(predictor.predict_volume(volume, name="microglia_1.tif"), expected)
    assert predictor.predict_volume(volume, name="cfos_neuron_1.tif").sum() == (probability >= 0.3).sum()

    io.write_volume(volume, tmp_path / "microglia_1.tif")
    result = predict_file(predictor, tmp_path / "microglia_1.tif", tmp_path / "out" / "microglia_1.tif")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "out" / "microglia_1.tif").load(), expected)
    assert result.record["postprocess"]["intensity_floor"] == 0.6

    resampling = Predictor(tiny_model, tiny_model_config, dataclasses.replace(settings, spacing=(1.0, 1.0, 1.0)),
                           device="cpu", engine="torch", options=RunOptions(progress=False))
    io.write_volume(volume, tmp_path / "z2" / "microglia_2.tif", spacing=(2.0, 1.0, 1.0))
    predict_file(resampling, tmp_path / "z2" / "microglia_2.tif", tmp_path / "out" / "microglia_2.tif")
    written = io.read_volume(tmp_path / "out" / "microglia_2.tif").load()
    assert written.any() and not written[normalised < 0.6].any()

    with pytest.raises(ValueError, match="intensity_floor needs"):
        predictor.binary_mask(np.zeros((4, 4, 4), np.float32), settings=settings.for_structure("microglia"))
    with pytest.raises(ConfigError, match="intensity_floor inf must be a finite number"):
        InferenceSettings(per_structure={"microglia": {"intensity_floor": float("inf")}})


def test_input_scale_predicts_a_structures_volumes_on_a_rescaled_grid(tiny_model, tiny_model_config, tmp_path):
    """A structure's input_scale resamples its volumes before the network and the logits back: the
    same mask from an array and from a file (in memory, whatever the block size), at the volume's
    shape, recorded in the provenance; other structures keep their own grid."""
    from lsmseg.inference.predictor import _resize

    volume = np.random.default_rng(3).gamma(2.0, 300.0, (20, 40, 48)).astype(np.uint16)
    settings = InferenceSettings(threshold=0.5, per_structure={"cfos_neuron": {"input_scale": 1.5}})
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch",
                          options=RunOptions(progress=False, block_size=16))
    normalised = predictor.normalised(volume)
    plain = predictor.predict_logits(volume, name="microglia_1.tif")
    scaled = predictor.predict_logits(volume, name="cfos_neuron_1.tif")
    assert scaled.shape == volume.shape and not np.allclose(scaled, plain)
    on_grid = predictor.sliding_window_logits(_resize(normalised, [30, 60, 72]))
    np.testing.assert_allclose(scaled, _resize(on_grid, volume.shape), atol=1e-5)

    io.write_volume(volume, tmp_path / "cfos_neuron_1.tif")
    result = predict_file(predictor, tmp_path / "cfos_neuron_1.tif", tmp_path / "out" / "cfos_neuron_1.tif")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "out" / "cfos_neuron_1.tif").load(),
                                  predictor.predict_volume(volume, name="cfos_neuron_1.tif"))
    assert result.record["postprocess"]["input_scale"] == 1.5
    with pytest.raises(ConfigError, match="input_scale 0.0 must lie within"):
        InferenceSettings(per_structure={"cfos_neuron": {"input_scale": 0}})


def test_a_per_axis_input_scale_rescales_each_axis_by_its_own_factor(tiny_model, tiny_model_config, tmp_path):
    """Three factors (z, y, x; a manifest's list) resample each axis by its own, e.g. only z of an
    anisotropic c-Fos volume: the network's grid, the logits, and the provenance's record."""
    from lsmseg.inference.predictor import _resize

    volume = np.random.default_rng(3).gamma(2.0, 300.0, (20, 40, 48)).astype(np.uint16)
    settings = InferenceSettings(threshold=0.5, per_structure={"cfos_neuron": {"input_scale": [1.5, 1, 1]}})
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch",
                          options=RunOptions(progress=False, block_size=16))
    assert predictor.settings_for("cfos_neuron_1.tif").input_scale == (1.5, 1.0, 1.0)
    assert predictor.network_shape(volume.shape, None, "cfos_neuron_1.tif") == [30, 40, 48]
    scaled = predictor.predict_logits(volume, name="cfos_neuron_1.tif")
    on_grid = predictor.sliding_window_logits(_resize(predictor.normalised(volume), [30, 40, 48]))
    np.testing.assert_allclose(scaled, _resize(on_grid, volume.shape), atol=1e-5)

    io.write_volume(volume, tmp_path / "cfos_neuron_1.tif")
    result = predict_file(predictor, tmp_path / "cfos_neuron_1.tif", tmp_path / "out" / "cfos_neuron_1.tif")
    written = json.loads((tmp_path / "out" / "cfos_neuron_1.tif.provenance.json").read_text())
    assert result.record["postprocess"]["input_scale"] == written["postprocess"]["input_scale"] == [1.5, 1.0, 1.0]


def test_an_all_ones_input_scale_is_the_volumes_own_grid_bit_for_bit(tiny_model, tiny_model_config, tmp_path):
    """(1, 1, 1) is 1: no resampling (block by block from a file), the same masks, recorded as 1.0."""
    volume = np.random.default_rng(5).gamma(2.0, 300.0, (20, 40, 48)).astype(np.uint16)
    io.write_volume(volume, tmp_path / "cfos_neuron_1.tif")
    masks, records = {}, {}
    for scale in (1.0, (1, 1, 1)):
        predictor = Predictor(tiny_model, tiny_model_config, InferenceSettings(threshold=0.5, input_scale=scale),
                              device="cpu", engine="torch", options=RunOptions(progress=False, block_size=16))
        assert predictor.network_shape(volume.shape, None, "cfos_neuron_1.tif") is None
        out = tmp_path / str(scale) / "cfos_neuron_1.tif"
        records[scale] = predict_file(predictor, tmp_path / "cfos_neuron_1.tif", out).record["postprocess"]
        masks[scale] = io.read_volume(out).load()
    assert masks[1.0].any()
    np.testing.assert_array_equal(masks[(1, 1, 1)], masks[1.0])
    assert records[(1, 1, 1)]["input_scale"] == records[1.0]["input_scale"] == 1.0


@pytest.mark.parametrize("value, message", [
    ((1.5, 1, 5), "input_scale 1.5,1.0,5.0 must lie within 0.25-4 (each factor)"),
    ((1.5, 0.1, 1), "input_scale 1.5,0.1,1.0 must lie within 0.25-4 (each factor)"),
    ((1.5, 1), "input_scale (1.5, 1) must be one number or three (z, y, x)"),
])
def test_an_input_scale_factor_out_of_range_or_a_wrong_count_is_refused(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        InferenceSettings(input_scale=value)
    with pytest.raises(ConfigError, match=r"per_structure\.cfos_neuron(: |\.)input_scale"):  # a manifest's list
        InferenceSettings(per_structure={"cfos_neuron": {"input_scale": list(value)}})


def test_an_input_scale_given_as_a_numpy_array_is_its_factors():
    # Was: refused as "must be one number or three", with a multi-line repr for a 2-D array.
    assert InferenceSettings(input_scale=np.array([1.5, 1, 1])).input_scale == (1.5, 1.0, 1.0)
    assert InferenceSettings(input_scale=np.float32(1.5)).input_scale == 1.5
    with pytest.raises(ValueError, match=r"must be one number or three") as refused:
        InferenceSettings(input_scale=np.full((3, 3), 9.0))
    assert "\n" not in str(refused.value)
