"""The dask front end's failure paths: no .partial-* store left by a block still running when another
fails; a bounded wait for cancelled blocks (a dying worker: tests/integration/test_dask.py)."""

import numpy as np
import pytest
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings, ModelConfig
from lsmseg.inference import Predictor, RunOptions

ROI = (32, 64, 64)


def test_a_block_still_running_when_another_fails_leaves_no_partial_store(tmp_path, monkeypatch):
    # Cancelling a volume's tasks does not stop a block a worker is running: its mask was written
    # into the scratch store after the store had been removed, leaving a .partial-*.zarr behind.
    pytest.importorskip("distributed")
    import threading
    import time

    import zarr

    from lsmseg.distributed import predict_files_dask

    written = zarr.Array.__setitem__
    failed = threading.Event()

    def slow_first_block(array, key, value):  # a slow shared file system, slowest for block 0
        if key[0].start == 0:
            failed.wait(10)
            time.sleep(0.5)  # the driver removes the store now
        return written(array, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", slow_first_block)
    volume = np.random.default_rng(0).random((96, 64, 64)).astype(np.float32)
    volume[90, 5, 5] = np.nan  # in the regions of the last two blocks only
    io.write_volume(volume, tmp_path / "in" / "a.tif")
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 1, 1).eval()
    config = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=ROI)
    predictor = Predictor(model, config, InferenceSettings(overlap=0.5), device="cpu", engine="torch",
                          options=RunOptions(progress=False, skip_background=False, block_size=(16, 64, 64)))
    from lsmseg.inference import predictor as predictor_module

    refuse = predictor_module.refuse_non_finite

    def refuse_and_tell(*args, **kwargs):
        try:
            return refuse(*args, **kwargs)
        except Exception:
            failed.set()
            raise

    monkeypatch.setattr(predictor_module, "refuse_non_finite", refuse_and_tell)
    results = predict_files_dask(predictor, [tmp_path / "in" / "a.tif"], tmp_path / "out", n_workers=2,
                                 processes=False)
    assert not results[0].ok and "NaN" in results[0].error
    time.sleep(1.5)  # a write the driver did not wait for lands now
    assert list((tmp_path / "out").iterdir()) == []


def test_the_wait_for_cancelled_blocks_is_bounded_when_workers_do_not_answer(monkeypatch):
    # Client.run has no timeout: a worker whose event loop hangs held the failed volume's wait forever.
    import threading
    import time

    from lsmseg import distributed

    release = threading.Event()

    class HungClient:
        def run(self, *args, **kwargs):
            release.wait(30)
            return {}

    started = time.monotonic()
    distributed._wait_for_running(HungClient(), "lsmseg-block-x-", timeout=0.2)
    release.set()
    assert time.monotonic() - started < 5


def test_the_wait_for_cancelled_blocks_ends_when_none_runs(monkeypatch):
    from lsmseg import distributed

    answers = iter([{"w1": ["lsmseg-block-x-0"]}, {"w1": []}])

    class Client:
        def run(self, function, prefix):
            return next(answers)

    distributed._wait_for_running(Client(), "lsmseg-block-x-", timeout=10)
    assert next(answers, None) is None  # asked until nothing ran, then stopped
