"""Preview pictures (``lsmseg predict --preview``): built block by block, never costing the mask."""

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from lsmseg import io
from lsmseg.cli import main
from lsmseg.config import InferenceSettings
from lsmseg.errors import EXIT_USAGE
from lsmseg.inference import Predictor, RunOptions, predict_files
from lsmseg.inference.preview import MASK_COLOUR, ProjectionPreview

from .test_challenge import volume


def _pooled_max(plane: np.ndarray, factor: int) -> np.ndarray:
    """The reference: pad to whole cells, then each cell's maximum (NumPy's plain max)."""
    rows, cols = -plane.shape[0] % factor, -plane.shape[1] % factor
    fill = False if plane.dtype == bool else -np.inf
    padded = np.pad(plane, ((0, rows), (0, cols)), constant_values=fill)
    return padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).max(axis=(1, 3))


def _blocks(shape, edges):
    """Every block of a grid with the given (z, y, x) block edges, z-ranges in order."""
    for z in range(0, shape[0], edges[0]):
        for y in range(0, shape[1], edges[1]):
            for x in range(0, shape[2], edges[2]):
                yield (slice(z, min(z + edges[0], shape[0])), slice(y, min(y + edges[1], shape[1])),
                       slice(x, min(x + edges[2], shape[2])))


@pytest.mark.parametrize("edges", [(20, 70, 90), (7, 13, 11), (3, 5, 31)])
def test_projections_built_block_by_block_equal_the_whole_volume_pooled(tmp_path, edges):
    rng = np.random.default_rng(0)
    shape = (20, 70, 90)
    image = rng.integers(0, 4000, shape).astype(np.uint16)
    mask = (rng.random(shape) > 0.97).astype(np.uint8) * 255
    source = io.read_volume(io.write_volume(image, tmp_path / "in.tif"), lazy=True)
    preview = ProjectionPreview(source, max_side=25)  # factor 4: block borders cut the cells
    assert preview.factor == 4
    for index in _blocks(shape, edges):
        preview.put(index, mask[index])
    np.testing.assert_array_equal(preview.image, _pooled_max(image.max(axis=0).astype(np.float32), 4))
    np.testing.assert_array_equal(preview.mask, _pooled_max(mask.any(axis=0), 4))


def test_picture_tints_the_mask_and_ignores_nan_voxels(tmp_path):
    image = np.zeros((4, 30, 40), np.float32)
    image[:, 5:25, 5:35] = 100.0
    image[1, 0, 0] = np.nan  # a NaN voxel must not blank its projection pixel
    mask = np.zeros(image.shape, np.uint8)
    mask[2, 10:20, 10:20] = 1
    source = io.read_volume(io.write_volume(image, tmp_path / "in.tif"), lazy=True)
    preview = ProjectionPreview(source)
    preview.put(tuple(slice(0, s) for s in image.shape), mask)
    assert preview.image[0, 0] == 0.0
    picture = preview.picture()
    assert picture.shape == (30, 40, 3) and picture.dtype == np.uint8
    assert (picture[10, 10] == MASK_COLOUR).all()  # the outline
    inside, outside = picture[15, 15].astype(int), picture[22, 30].astype(int)
    assert inside[0] > inside[1] and outside[0] == outside[1] == outside[2]  # tinted vs grey
    assert (picture[0, 0] == 0).all()  # the dark background stays dark


@pytest.fixture
def previewing(tiny_model, tiny_model_config):
    return Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu",
                     options=RunOptions(progress=False, preview=True, block_size=(6, 32, 32)))


def test_predict_writes_the_picture_and_records_it(tmp_path, previewing):
    image = io.write_volume(volume((6, 40, 56)), tmp_path / "in" / "x.tif")
    [result] = predict_files(previewing, [image], tmp_path / "out")
    assert result.ok
    picture = tmp_path / "out" / "x.tif.preview.png"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(picture))).shape == (40, 56, 3)
    provenance = json.loads((tmp_path / "out" / "x.tif.provenance.json").read_text())
    assert provenance["preview"] == str(picture)
    assert io.list_volumes(tmp_path / "out") == [tmp_path / "out" / "x.tif"]  # not taken for a volume


def test_a_failing_picture_is_one_warning_and_the_mask_is_still_written(tmp_path, previewing, monkeypatch, caplog):
    from lsmseg.inference import preview as preview_module

    def broken(self, index, mask_block):
        raise OSError("disk hiccup")

    monkeypatch.setattr(preview_module.ProjectionPreview, "put", broken)
    image = io.write_volume(volume((6, 40, 56)), tmp_path / "in" / "x.tif")
    with caplog.at_level(logging.WARNING):
        [result] = predict_files(previewing, [image], tmp_path / "out")
    assert result.ok
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.tif", "x.tif.provenance.json"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{tmp_path / 'out' / 'x.tif.preview.png'}: no preview picture (disk hiccup)"]
    assert "preview" not in json.loads((tmp_path / "out" / "x.tif.provenance.json").read_text())


def test_a_mask_written_again_without_a_picture_leaves_no_stale_one(tmp_path, previewing, tiny_model, tiny_model_config):
    image = io.write_volume(volume((6, 40, 56)), tmp_path / "in" / "x.tif")
    predict_files(previewing, [image], tmp_path / "out")
    assert (tmp_path / "out" / "x.tif.preview.png").is_file()
    plain = Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu", options=RunOptions(progress=False))
    [result] = predict_files(plain, [image], tmp_path / "out")
    assert result.ok and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.tif", "x.tif.provenance.json"]


def test_an_old_picture_that_cannot_be_removed_is_a_warning_not_a_failed_volume(tmp_path, previewing, tiny_model,
                                                                                 tiny_model_config, monkeypatch, caplog):
    from pathlib import Path

    image = io.write_volume(volume((6, 40, 56)), tmp_path / "in" / "x.tif")
    predict_files(previewing, [image], tmp_path / "out")
    real_unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.name.endswith(".preview.png"):
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    plain = Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu", options=RunOptions(progress=False))
    with caplog.at_level(logging.WARNING):
        [result] = predict_files(plain, [image], tmp_path / "out")
    assert result.ok and "preview" not in json.loads((tmp_path / "out" / "x.tif.provenance.json").read_text())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{tmp_path / 'out' / 'x.tif.preview.png'}: cannot remove the picture of the replaced mask "
                        "(Operation not permitted)"]


def test_no_picture_when_the_mask_fails(tmp_path, previewing):
    bad = tmp_path / "in" / "bad.tif"
    bad.parent.mkdir()
    bad.write_bytes(b"II*\x00not a tiff")
    [result] = predict_files(previewing, [bad], tmp_path / "out")
    assert not result.ok and list((tmp_path / "out").glob("*.png")) == []


def test_preview_with_dask_is_a_usage_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "-o", str(tmp_path / "out"), "--preview", "--scheduler", "dask"]) == EXIT_USAGE
    assert "--preview is not supported with --scheduler dask" in capsys.readouterr().err
