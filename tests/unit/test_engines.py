"""The exported engines (ONNX Runtime, OpenVINO) give PyTorch's logits within float tolerance (each
skipped where not installed)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, engines, predict_file

pytest.importorskip("onnx")


@pytest.fixture(params=engines.EXPORTED_ENGINES)
def exported(request):
    """Each engine that runs the ONNX export, skipped where its package is not installed."""
    pytest.importorskip(request.param)
    return request.param


def test_exported_engine_logits_equal_pytorch(exported, tiny_model, tiny_model_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    image = np.random.default_rng(0).random((40, 70, 80), dtype=np.float32)
    settings = InferenceSettings(overlap=0.5)
    options = RunOptions(progress=False)
    ours = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine=exported, options=options)
    reference = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine="torch", options=options)
    assert ours.engine == exported and reference.engine == "torch"
    got, expected = ours.sliding_window_logits(image), reference.sliding_window_logits(image)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert list((tmp_path / "onnx").glob("*.onnx")), "the exported network is cached"
    # A second predictor reuses the cached file (no export): same numbers.
    again = Predictor(tiny_model, tiny_model_config, settings, device="cpu", engine=exported, options=options)
    np.testing.assert_array_equal(again.sliding_window_logits(image), got)


@pytest.mark.parametrize("threads", [1, 2])  # one stream; two, each batch split across two infer requests
def test_openvino_engine_pickles_and_runs_from_threads(threads, tiny_model, tiny_model_config, tmp_path, monkeypatch):
    """A dask worker gets a pickled engine (no compiled model in it); threads share one engine."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("openvino")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    engine = engines.OpenVinoEngine(tiny_model, engines.model_key(tiny_model), threads=threads)
    windows = torch.from_numpy(np.random.default_rng(2).random((3, 1, *tiny_model_config.roi), dtype=np.float32))
    first = engine(windows).numpy()
    copy = pickle.loads(pickle.dumps(engine))
    assert copy._sessions == {} and copy._requests == {} and engine._sessions, "compiled models stay with their process"
    with torch.inference_mode():
        expected = tiny_model(windows).numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(copy(windows).numpy(), first)
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: engine(windows).numpy(), range(8)):
            np.testing.assert_array_equal(got, first)


def test_openvino_two_streams_split_the_batch_and_keep_the_logits(tiny_model, tiny_model_config, tmp_path,
                                                                 monkeypatch):
    """From two threads on, a batch runs as two halves side by side (two infer requests, two
    compiled streams), with the logits of one stream running it whole: odd, even and single batches."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    key = engines.model_key(tiny_model)
    one, two = engines.OpenVinoEngine(tiny_model, key, threads=1), engines.OpenVinoEngine(tiny_model, key, threads=2)
    assert (one.config()["NUM_STREAMS"], two.config()["NUM_STREAMS"]) == (1, 2)
    rng = np.random.default_rng(4)
    for n in (3, 4, 1):
        windows = torch.from_numpy(rng.random((n, 1, *tiny_model_config.roi), dtype=np.float32))
        np.testing.assert_array_equal(two(windows).numpy(), one(windows).numpy())
    window = tuple(tiny_model_config.roi)
    assert two.session(window).get_property("NUM_STREAMS") == 2 and len(two._requests[window]) == 2
    assert one._requests == {window: []}, "one stream runs the batch whole"
    requests = list(two._requests[window])
    two(windows)
    assert two._requests[window] == requests, "the infer requests are made once, not per call"
    # Batches of one window keep all the threads on one stream; so does one thread.
    assert engines.OpenVinoEngine(tiny_model, key, threads=2, batch_size=1).config()["NUM_STREAMS"] == 1
    # A second engine imports the cached two-stream model: still two streams, same logits.
    again = engines.OpenVinoEngine(tiny_model, key, threads=2)
    np.testing.assert_array_equal(again(windows).numpy(), one(windows).numpy())
    assert again.describe()[0]["imported"] is True and len(again._requests[window]) == 2


def test_predictor_gives_openvino_its_batch_size(tiny_model, tiny_model_config, tmp_path, monkeypatch):
    """The predictor's ``sw_batch_size`` reaches the engine: batches of one window keep one stream."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    streams = {}
    for batch in (1, 4):
        predictor = Predictor(tiny_model, tiny_model_config, InferenceSettings(sw_batch_size=batch), device="cpu",
                              engine="openvino", options=RunOptions(progress=False))
        predictor._onnx.threads = 2  # as on a 2-core machine
        streams[batch] = predictor._onnx.config()["NUM_STREAMS"]
    assert streams == {1: 1, 4: 2}


def test_run_split_waits_for_every_started_request():
    """A request failing to start leaves none of the started ones busy (the next call reuses them)."""

    class Request:
        def __init__(self, fail=False):
            self.fail, self.running = fail, False

        def start_async(self, inputs):
            if self.fail:
                raise RuntimeError("cannot start")
            self.running = True

        def wait(self):
            self.running = False

    good, bad = Request(), Request(fail=True)
    with pytest.raises(RuntimeError, match="cannot start"):
        engines.run_split([good, bad], np.zeros((4, 1, 2, 2, 2), dtype=np.float32))
    assert not good.running


def test_openvino_unreadable_compiled_model_is_compiled_again(tiny_model, tiny_model_config, tmp_path, monkeypatch,
                                                              caplog):
    """A cached compiled model OpenVINO cannot import (truncated, another build's) costs one warning and
    a compile, whose result replaces it; the logits are unchanged."""
    import logging

    pytest.importorskip("openvino")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    windows = torch.from_numpy(np.random.default_rng(3).random((2, 1, *tiny_model_config.roi), dtype=np.float32))
    key = engines.model_key(tiny_model)
    expected = engines.OpenVinoEngine(tiny_model, key, threads=1)(windows).numpy()
    blob = engines.OpenVinoEngine(tiny_model, key, threads=1).blob_path(tiny_model_config.roi)
    blob.write_bytes(blob.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lsmseg.inference.engines"):
        engine = engines.OpenVinoEngine(tiny_model, key, threads=1)
        got = engine(windows).numpy()
    np.testing.assert_array_equal(got, expected)
    [line] = [r.getMessage() for r in caplog.records if r.name == "lsmseg.inference.engines"]
    assert str(blob) in line and "compiling it again" in line
    assert engine.describe()[0]["imported"] is False
    again = engines.OpenVinoEngine(tiny_model, key, threads=1)  # the rewritten blob imports
    np.testing.assert_array_equal(again(windows).numpy(), expected)
    assert again.describe()[0]["imported"] is True
    # Another thread count is another compiled model (the settings are part of its name).
    assert engines.OpenVinoEngine(tiny_model, key, threads=2).blob_path(tiny_model_config.roi) != blob


def test_export_engine_can_compile_ahead(tiny_model, tiny_model_config, tmp_path, monkeypatch):
    """``export_engine(compiled=True)`` leaves OpenVINO's compiled model in the cache; the first
    prediction imports it instead of compiling."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(tmp_path))
    options = RunOptions(progress=False)
    predictor = Predictor(tiny_model, tiny_model_config, device="cpu", engine="openvino", options=options)
    predictor.export_engine(compiled=True)
    [blob] = (tmp_path / "openvino").iterdir()
    predictor.sliding_window_logits(np.zeros((20, 40, 40), dtype=np.float32))
    assert predictor._onnx.describe() == [{"window": list(tiny_model_config.roi), "compiled_model": str(blob),
                                           "imported": True}]


def test_engine_choice(monkeypatch):
    from lsmseg.inference.engines import resolve_engine

    cpu = torch.device("cpu")
    installed = {"onnxruntime": True, "openvino": True}
    for name in installed:
        monkeypatch.setitem(engines._AVAILABLE, name, lambda name=name: installed[name])
    assert resolve_engine("auto", cpu, "auto", False) == "openvino", "the fastest installed engine first"
    installed["openvino"] = False
    assert resolve_engine("auto", cpu, "auto", False) == "onnxruntime"
    with pytest.raises(ValueError, match=r"lsmseg\[openvino\]"):
        resolve_engine("openvino", cpu, "auto", False)
    installed["onnxruntime"] = False
    assert resolve_engine("auto", cpu, "auto", False) == "torch"
    installed.update(onnxruntime=True, openvino=True)
    assert resolve_engine("auto", cpu, "bf16", False) == "torch"
    assert resolve_engine("auto", cpu, "auto", True) == "torch", "torch.compile runs in PyTorch"
    assert resolve_engine("auto", torch.device("cuda"), "auto", False) == "torch"
    for engine in engines.EXPORTED_ENGINES:
        with pytest.raises(ValueError, match="CPU in fp32 only"):
            resolve_engine(engine, torch.device("cuda"), "auto", False)


def test_cache_hit_and_unwritable_cache(exported, tiny_model, tiny_model_config, tmp_path, monkeypatch, caplog):
    """A prefilled cache is used as is; a read-only one without these weights gets one warning line and
    an export to a temporary folder (an image's cache with weights mounted at /opt/ml/model)."""
    import logging
    import os
    import tempfile

    from lsmseg import io

    image = np.random.default_rng(1).integers(0, 4000, (20, 40, 40)).astype(np.uint16)
    io.write_volume(image, tmp_path / "x.tif")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LSMSEG_CACHE_DIR", str(cache))

    def run(name):
        predictor = Predictor(tiny_model, tiny_model_config, device="cpu", engine=exported,
                              options=RunOptions(progress=False))
        record = predict_file(predictor, tmp_path / "x.tif", tmp_path / f"{name}.tif").record
        return record["parameters"], io.read_volume(tmp_path / f"{name}.tif").load()

    first, mask = run("first")  # writable cache: export into it
    [model] = first["onnx_models"]
    assert first["engine"] == exported and model["exported"] and model["cached"]
    assert Path(model["file"]).parent == cache / "onnx"
    assert Path(model["file"]).stat().st_mode & 0o777 == 0o644, "readable by others (an image's non-root user)"
    again, same = run("again")  # cache hit, no export
    if exported == "openvino":  # and the compiled model, cached beside the export, is imported
        blob = Path(model.pop("compiled_model"))
        assert model.pop("imported") is False and blob.parent == cache / "openvino"
        assert blob.stat().st_mode & 0o777 == 0o644
        assert again["onnx_models"] == [{"window": model["window"], "compiled_model": str(blob), "imported": True}]
    else:
        assert again["onnx_models"] == [{**model, "exported": False}]
    np.testing.assert_array_equal(same, mask)

    # Read-only cache (as for uid 1001 in the image) holding other weights' files only.
    for path in [*(cache / "onnx").iterdir(), *(cache / "openvino").glob("*")]:
        path.rename(path.with_name("0" * 16 + path.name[16:]))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).parent != cache and access(path, mode, **kw))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lsmseg.inference.engines"):
        elsewhere, other = run("elsewhere")
    [model] = elsewhere["onnx_models"]
    assert model["exported"] and not model["cached"] and Path(model["file"]).parent.parent == tmp_path
    assert "compiled_model" not in model, "a read-only cache gets no compiled model either"
    [line] = [r for r in caplog.records if r.name == "lsmseg.inference.engines"]
    assert line.levelno == logging.WARNING and "not writable" in line.getMessage()
    assert sorted(p.name[:16] for p in (cache / "onnx").iterdir()) == ["0" * 16], "nothing written to the cache"
    if exported == "openvino":
        assert sorted(p.name[:16] for p in (cache / "openvino").iterdir()) == ["0" * 16]
    np.testing.assert_array_equal(other, mask)


SIGNAL_AFTER_ENGINES = """
import gc, os, signal, sys, time
import torch
from lsmseg.config import ModelConfig
from lsmseg.inference import engines
from lsmseg.model import build_model

config = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=(32, 64, 64))
model = build_model(config).eval()
windows = torch.zeros(1, 1, *config.roi)
first, second = (engines.OpenVinoEngine(model, "k", threads=1) for _ in range(2))  # two predictors' engines
first(windows)
second(windows)
del first  # released in the order they were made (a list would release them in reverse)
gc.collect()
del second
gc.collect()

def stop(signum, frame):
    print("handled", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not delivered", flush=True)
"""


def test_a_signal_after_openvino_engines_are_released_is_still_handled(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack; with a Core per engine, two
    released in creation order left it unmapped, and SIGTERM (docker stop) then segfaulted the
    process instead of reaching its handler. Run in a child so that a crash fails this test only."""
    import os
    import subprocess
    import sys

    pytest.importorskip("openvino")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    env["LSMSEG_CACHE_DIR"] = str(tmp_path)
    for extra in ({}, {"PYTHONFAULTHANDLER": "1"}):  # pytest and PYTHONFAULTHANDLER install an alternate stack too
        result = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_ENGINES], capture_output=True, text=True,
                                env={**env, **extra}, timeout=300)
        assert (result.returncode, result.stdout.strip()) == (0, "handled"), (extra, result.returncode,
                                                                             result.stderr[-2000:])


def test_openvino_is_imported_without_its_usage_telemetry():
    # `import openvino` imports its converter, which sent a usage event to Google Analytics
    # (openvino-telemetry, on unless the user opted out) on every lsmseg run with OpenVINO.
    pytest.importorskip("openvino")
    if importlib.util.find_spec("openvino_telemetry") is None:
        pytest.skip("openvino-telemetry is not installed")
    probe = (
        "import sys\n"
        "from lsmseg.inference.engines import import_openvino\n"
        "ov = import_openvino()\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(telemetry_utils.tm.__name__)\n"
        "print('openvino_telemetry' in sys.modules)\n"
        "import openvino_telemetry\n"  # the process may still use it itself
        "print(openvino_telemetry.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "False", "openvino_telemetry"]


def test_openvino_imported_from_two_threads_at_once_is_whole_in_both():
    # The second caller found the half-loaded module in sys.modules and failed with "partially
    # initialized module 'openvino' has no attribute 'Core'"; a block the application set is kept.
    pytest.importorskip("openvino")
    probe = (
        "import sys, threading, time\n"
        "from lsmseg.inference import engines\n"
        "worker = threading.Thread(target=engines.import_openvino)\n"
        "worker.start()\n"
        "while 'openvino' not in sys.modules:\n"
        "    time.sleep(0.0005)\n"
        "ov = engines.import_openvino()\n"
        "print(hasattr(ov, 'Core'), hasattr(ov, '__version__'))\n"
        "worker.join()\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
    kept = (
        "import sys\n"
        "sys.modules['openvino_telemetry'] = None\n"  # the application's own block
        "from lsmseg.inference.engines import import_openvino\n"
        "import_openvino()\n"
        "print(sys.modules.get('openvino_telemetry', 'gone'))\n"
    )
    result = subprocess.run([sys.executable, "-c", kept], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None"]
