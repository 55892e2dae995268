"""Probability maps: streamed beside the mask, removed when the mask fails."""

import numpy as np
import pytest

from lsmseg import io
from lsmseg.inference.probabilities import ProbabilityWriter, probability_blocks


def test_probability_encodings():
    logits = np.array([-np.inf, -2.0, 0.0, 2.0, np.inf], dtype=np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert probability_blocks(logits, "uint8").tolist() == np.rint(p * 255).astype(int).tolist()
    assert np.allclose(probability_blocks(logits, "float16"), p, atol=1e-3)


def _volume(tmp_path, shape=(4, 6, 5)):
    io.write_volume(np.zeros(shape, np.uint16), tmp_path / "in.tif", spacing=(2.0, 1.0, 1.0))
    return io.read_volume(tmp_path / "in.tif", lazy=True)


def test_writer_streams_blocks_into_the_same_format(tmp_path):
    volume = _volume(tmp_path)
    writer = ProbabilityWriter(tmp_path / "p" / "in.tif", volume, "uint8")
    for z in (0, 2):
        writer.put((slice(z, z + 2), slice(0, 6), slice(0, 5)), np.full((2, 6, 5), float(z), np.float32))
    writer.finish()
    out = io.read_volume(tmp_path / "p" / "in.tif")
    assert out.spacing == pytest.approx((2.0, 1.0, 1.0))
    assert out.load()[:2].max() == 128 and out.load()[2:].min() == round(255 / (1 + np.exp(-2.0)))


def test_abort_leaves_nothing(tmp_path):
    volume = _volume(tmp_path)
    writer = ProbabilityWriter(tmp_path / "p" / "in.tif", volume, "float16")
    writer.put((slice(0, 2), slice(0, 6), slice(0, 5)), np.zeros((2, 6, 5), np.float32))
    writer.abort()
    assert list((tmp_path / "p").iterdir()) == []
