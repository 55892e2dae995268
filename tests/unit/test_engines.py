"""The ONNX Runtime engine gives PyTorch's logits within float tolerance (skipped where not installed)."""

import numpy as np
import pytest
import torch

from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_onnxruntime_logits_equal_pytorch(tiny_model, tiny_model_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    image = np.random.default_rng(0).random((40, 70, 80), dtype=np.float32)
    settings = InferenceSettings(overlap=0.5)
    options = RunOptions(progress=False)
    ours = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="onnxruntime", options=options)
    reference = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch", options=options)
    assert ours.engine == "onnxruntime" and reference.engine == "torch"
    got, expected = ours.sliding_window_logits(image), reference.sliding_window_logits(image)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert list((tmp_path / "onnx").glob("*.onnx")), "the exported network is cached"
    # A second predictor reuses the cached file (no export): same numbers.
    again = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="onnxruntime", options=options)
    np.testing.assert_array_equal(again.sliding_window_logits(image), got)


def test_engine_choice():
    from lsmseg.inference.engines import resolve_engine

    cpu = torch.device("cpu")
    assert resolve_engine("auto", cpu, "auto", False) == "onnxruntime"
    assert resolve_engine("auto", cpu, "bf16", False) == "torch"
    assert resolve_engine("auto", torch.device("cuda"), "auto", False) == "torch"
    with pytest.raises(ValueError):
        resolve_engine("onnxruntime", torch.device("cuda"), "auto", False)
