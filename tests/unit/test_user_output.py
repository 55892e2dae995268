"""What a user reads beside each mask: the provenance JSON's record of when the mask was made, and a
preview picture that keeps the plane's physical proportions when y and x spacings differ."""

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, predict_files
from lsmseg.inference.preview import ProjectionPreview

from ..conftest import make_weights
from .test_challenge import volume


@pytest.fixture
def predictor(tiny_model, tiny_model_config):
    return Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu",
                     options=RunOptions(progress=False))


def test_provenance_records_when_the_mask_was_written(tmp_path, predictor):
    # Timings say how long, the input's fingerprint when the input changed; neither says when the
    # mask was made, and a copied file loses its modification time.
    image = io.write_volume(volume((6, 40, 56)), tmp_path / "in" / "x.tif")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    [result] = predict_files(predictor, [image], tmp_path / "out")
    after = datetime.now(timezone.utc)
    record = json.loads((tmp_path / "out" / "x.tif.provenance.json").read_text())
    finished = datetime.fromisoformat(record["finished"])
    assert finished.utcoffset() == timedelta(0)  # UTC, said in the text itself
    assert before <= finished <= after
    assert result.record["finished"] == record["finished"]


def _square_preview(tmp_path, spacing, shape=(4, 60, 60), square_um=40.0, max_side=1024):
    """A preview of a ``square_um`` x ``square_um`` bright square (its mask too) at ``spacing``."""
    rows, cols = round(square_um / spacing[1]), round(square_um / spacing[2])
    image = np.zeros(shape, np.uint16)
    image[:, 5:5 + rows, 5:5 + cols] = 1000
    source = io.read_volume(io.write_volume(image, tmp_path / "in.tif", spacing=spacing), lazy=True)
    preview = ProjectionPreview(source, max_side=max_side)
    preview.put(tuple(slice(0, s) for s in shape), image > 0)
    return preview.picture()


def _drawn_extent(where):
    ys, xs = np.nonzero(where)
    return np.ptp(ys) + 1, np.ptp(xs) + 1


@pytest.mark.parametrize("spacing", [(3.0, 1.0, 2.0), (3.0, 2.0, 1.0)])
def test_a_square_stays_square_when_the_y_and_x_spacings_differ(tmp_path, spacing):
    picture = _square_preview(tmp_path, spacing)
    tinted = picture[..., 0] != picture[..., 1]  # the mask (grey pixels have equal channels)
    rows, cols = _drawn_extent(tinted)
    assert rows == cols == 40  # at the finer spacing's pixels: nothing is shrunk
    assert tinted.sum() == 40 * 40  # a filled square: the overlay is the bright square, whole
    assert picture.shape == ((60, 120, 3) if spacing[2] > spacing[1] else (120, 60, 3))


def test_square_pixels_never_exceed_the_longest_side(tmp_path):
    picture = _square_preview(tmp_path, (3.0, 1.0, 4.0), shape=(4, 200, 60), max_side=100)
    # 200 x 240 um at 2.4 um a pixel (not 1 um: the longest side would be 240)
    assert picture.shape == (83, 100, 3)
    tinted = picture[..., 0] != picture[..., 1]
    rows, cols = _drawn_extent(tinted)
    assert abs(rows - cols) <= 2  # still a square (before: 21 x 6); max-pooling widens an edge by a pixel


def test_equal_spacings_and_unknown_spacing_keep_the_pooled_grid(tmp_path):
    picture = _square_preview(tmp_path, (3.0, 1.0, 1.0))
    assert picture.shape == (60, 60, 3)
    image = np.zeros((4, 30, 50), np.uint16)
    source = io.read_volume(io.write_volume(image, tmp_path / "none.tif"), lazy=True)
    assert source.spacing is None or source.spacing[1] == source.spacing[2]
    preview = ProjectionPreview(source)
    preview.put(tuple(slice(0, s) for s in image.shape), image > 0)  # all dark, empty mask: a picture
    assert preview.picture().shape == (30, 50, 3)


def test_prefilling_an_unwritable_cache_fails_in_one_line_before_exporting(tmp_path, monkeypatch, capsys,
                                                                           tiny_model_config, tiny_model):
    # ``python -m lsmseg.inference`` exists to fill the cache (an image's build): an export to a
    # temporary folder instead, removed by no one and used by no later run, is not a success.
    from lsmseg.errors import EXIT_FAILED
    from lsmseg.inference import __main__ as prefill

    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(Predictor, "export_engine", lambda self: pytest.fail("exported although it cannot be kept"))
    assert prefill.main([str(manifest)]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"ERROR: {tmp_path / 'a-file' / 'cache' / 'onnx'}: ") and "LSMSEG_CACHE_DIR" in line


def test_a_log_line_is_printed_above_a_progress_bar_not_glued_to_it(monkeypatch):
    # Was a plain StreamHandler: on a terminal "ERROR: ..." followed the bar's text on its line.
    import io
    import logging
    import sys

    from tqdm import tqdm

    from lsmseg import cli

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.configure_logging()
        with tqdm(total=2, desc="volumes", file=stream, mininterval=0) as bar:
            bar.update(1)
            logging.getLogger("lsmseg.test").error("/in/broken.tif: not a TIFF")
        logging.getLogger("lsmseg.test").info("after the bar")
    finally:
        root.handlers[:], root.level = saved
    lines = [line.rsplit("\r", 1)[-1] for line in stream.getvalue().split("\n")]
    assert "ERROR: /in/broken.tif: not a TIFF" in lines and "after the bar" in lines


def test_a_long_volume_without_a_bar_logs_its_progress_now_and_then(caplog):
    # Was silent between "loaded weights" and the volume's result line when the output was piped
    # (docker logs): minutes for the vessels sample, hours for a whole organ.
    from lsmseg.inference.predictor import ProgressLines

    now = [0.0]
    lines = ProgressLines(total=100, name="organ", every=60.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="lsmseg.inference.predictor"):
        for _ in range(10):
            now[0] += 25.0  # 10 windows every 25 s
            lines.update(10)
    messages = [r.getMessage() for r in caplog.records]
    # Lines at 75, 150 and 225 s (60 s apart at least); none at 250 s, where the volume is done.
    assert messages == ["organ: 30 of 100 windows (30 %), about 3 min left",
                        "organ: 60 of 100 windows (60 %), about 2 min left",
                        "organ: 90 of 100 windows (90 %), about 25 s left"]


def test_progress_lines_appear_only_where_no_bar_is_drawn(tmp_path, tiny_weights, caplog, monkeypatch):
    import dataclasses

    import numpy as np

    from lsmseg.inference import Predictor
    from lsmseg.inference import predictor as module

    monkeypatch.setattr(module, "PROGRESS_LINE_SECONDS", 0.0)
    image = np.random.default_rng(0).random((32, 64, 192), dtype=np.float32)  # 5 windows: batches of 4 and 1
    predictor = Predictor.from_manifest(tiny_weights, engine="torch")
    for progress, expected in ((False, True), (True, False)):
        caplog.clear()
        predictor.options = dataclasses.replace(predictor.options, progress=progress)
        with caplog.at_level("INFO", logger="lsmseg.inference.predictor"):
            predictor.predict_logits(image, name="vol")
        assert any("vol: " in r.getMessage() and "windows" in r.getMessage() for r in caplog.records) is expected
