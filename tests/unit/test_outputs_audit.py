"""Outputs: an existing output survives until its replacement is in place; provenance says enough
to reproduce a mask."""

import errno
import os

import numpy as np
import pytest

from lsmseg.errors import OutputError, ProvenanceError
from lsmseg.io import atomic
from lsmseg.io.atomic import atomic_output, companion_output


def _failing_final_rename(monkeypatch, target_name):
    """Putting a new output in place of ``target_name`` fails (EIO) the first time, whether it is
    renamed onto it (os.replace) or trades places with it (atomic.exchange_paths)."""
    real_replace, real_exchange, failed = os.replace, atomic.exchange_paths, []

    def fails(src, dst):
        if not failed and os.path.basename(dst) == target_name and ".partial-" in os.path.basename(src):
            failed.append(src)
            raise OSError(errno.EIO, "Input/output error")

    def replace(src, dst, *args, **kwargs):
        fails(src, dst)
        return real_replace(src, dst, *args, **kwargs)

    def exchange(a, b):
        fails(a, b)
        return real_exchange(a, b)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic, "exchange_paths", exchange)


@pytest.mark.parametrize("folder", [False, True])
def test_old_output_survives_a_failed_final_rename(tmp_path, monkeypatch, folder):
    target = tmp_path / ("m.ome.zarr" if folder else "m.tif")
    if folder:
        (target / "0").mkdir(parents=True)
        (target / "0" / "chunk").write_text("old")
    else:
        target.write_text("old")
    _failing_final_rename(monkeypatch, target.name)
    with pytest.raises(OutputError, match="cannot write output"):
        with atomic_output(target, folder=folder) as tmp:
            if folder:
                (tmp / "0").mkdir(parents=True)
                (tmp / "0" / "chunk").write_text("new")
            else:
                tmp.write_text("new")
    old = target / "0" / "chunk" if folder else target
    assert old.read_text() == "old"  # the previous mask is still there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_old_two_file_output_survives_a_failed_header_rename(tmp_path, monkeypatch):
    (tmp_path / "m.mhd").write_text("old header")
    (tmp_path / "m.zraw").write_text("old data")
    _failing_final_rename(monkeypatch, "m.mhd")
    with pytest.raises(OutputError):
        with atomic_output(tmp_path / "m.mhd") as tmp:
            companion_output(tmp, "m.zraw").write_text("new data")
            tmp.write_text("new header")
    assert (tmp_path / "m.mhd").read_text() == "old header"
    assert (tmp_path / "m.zraw").read_text() == "old data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mhd", "m.zraw"]


def test_replacing_an_output_works(tmp_path):
    (tmp_path / "m.ome.zarr" / "0").mkdir(parents=True)
    (tmp_path / "m.ome.zarr" / "0" / "old").write_text("old")
    (tmp_path / "m.mhd").write_text("old header")
    (tmp_path / "m.zraw").write_text("old data")
    with atomic_output(tmp_path / "m.ome.zarr", folder=True) as tmp:
        (tmp / "0").mkdir(parents=True)
        (tmp / "0" / "new").write_text("new")
    with atomic_output(tmp_path / "m.mhd") as tmp:
        companion_output(tmp, "m.zraw").write_text("new data")
        tmp.write_text("new header")
    assert [p.name for p in (tmp_path / "m.ome.zarr" / "0").iterdir()] == ["new"]
    assert (tmp_path / "m.mhd").read_text() == "new header" and (tmp_path / "m.zraw").read_text() == "new data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mhd", "m.ome.zarr", "m.zraw"]


def _record(input_path, engine="torch"):
    from lsmseg.inference.blocks import plan_blocks
    from lsmseg.inference.results import BlockStats, provenance_record
    from lsmseg.io import Volume

    volume = Volume(data=np.zeros((4, 8, 8), np.uint8), spacing=(1.0, 1.0, 1.0), path=input_path, fmt="tiff", meta={})
    stats = BlockStats.start(plan_blocks((4, 8, 8), (4, 8, 8), 0.5), None)
    return provenance_record(input_path, input_path.with_suffix(".mask.tif"), volume, parameters={"engine": engine},
                             weights={}, stats=stats, foreground=0, timings={})


def test_provenance_names_the_engine_library_versions(tmp_path):
    """An ONNX Runtime or OpenVINO mask's numbers are those of that library: its version is recorded."""
    from importlib.metadata import version

    versions = _record(tmp_path / "v.tif")["versions"]
    for package in ("onnxruntime", "openvino"):
        pytest.importorskip(package)
        assert versions[package] == version(package)


def test_engine_version_read_under_its_other_distribution_names(tmp_path, monkeypatch):
    """onnxruntime-gpu (the CUDA build) is the onnxruntime module under another name: it was recorded as None."""
    from importlib.metadata import PackageNotFoundError

    published = {"onnxruntime-gpu": "1.99.0", "openvino-nightly": "2099.1.0.dev1"}

    def version(distribution):
        if distribution not in published:
            raise PackageNotFoundError(distribution)
        return published[distribution]

    monkeypatch.setattr("importlib.metadata.version", version)
    versions = _record(tmp_path / "v.tif")["versions"]
    assert versions["onnxruntime"] == "1.99.0" and versions["openvino"] == "2099.1.0.dev1"
    published.clear()
    versions = _record(tmp_path / "w.tif")["versions"]
    assert versions["onnxruntime"] is None and versions["openvino"] is None


def test_provenance_fingerprints_the_input_file(tmp_path):
    """Which input a mask came from: the same path may hold another volume later."""
    path = tmp_path / "v.tif"
    path.write_bytes(b"12345")
    stamp = 1_700_000_000
    os.utime(path, (stamp, stamp))
    record = _record(path)["input_file"]
    assert record == {"bytes": 5, "modified": "2023-11-14T22:13:20+00:00"}
    folder = tmp_path / "v.ome.zarr"
    folder.mkdir()
    assert _record(folder)["input_file"] is None  # a folder's files are not walked


@pytest.mark.parametrize("shape", [(1, 1, 1, 48, 40), (1, 1, 48, 40)])
def test_single_plane_ome_zarr_with_leading_axes_is_a_volume(tmp_path, shape):
    """A 5-D (t, c, z, y, x) OME-Zarr of one plane is a z=1 volume, as a 3-D (1, y, x) array is."""
    import zarr

    from lsmseg import io

    array = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=shape, dtype="uint16", chunks=shape)
    array[:] = np.arange(48 * 40, dtype=np.uint16).reshape(shape)
    volume = io.read_volume(tmp_path / "v.zarr")
    assert volume.shape == (1, 48, 40)
    np.testing.assert_array_equal(volume.load()[0], np.arange(48 * 40).reshape(48, 40))


def test_several_channels_are_still_refused(tmp_path):
    import zarr

    from lsmseg import io
    from lsmseg.errors import InputError

    zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=(2, 1, 8, 48, 40), dtype="uint16")
    with pytest.raises(InputError, match="4-D"):
        io.read_volume(tmp_path / "v.zarr")


def test_a_provenance_record_that_cannot_be_written_leaves_no_earlier_one(tmp_path, monkeypatch, tiny_model,
                                                                         tiny_model_config):
    # The new mask was in place but the JSON beside it was the earlier run's (its threshold 0.3).
    import json

    from lsmseg import io
    from lsmseg.config import InferenceSettings
    from lsmseg.inference import Predictor, RunOptions, predict_file
    from lsmseg.inference import run as run_module

    io.write_volume(np.random.default_rng(0).integers(0, 999, (16, 48, 48)).astype(np.uint16), tmp_path / "v.tif")
    record = tmp_path / "out" / "v.tif.provenance.json"
    for threshold in (0.3, 0.7):
        predictor = Predictor(tiny_model, tiny_model_config, InferenceSettings(threshold=threshold), device="cpu",
                              engine="torch", options=RunOptions(progress=False))
        if threshold == 0.7:
            def full(*args, **kwargs):
                raise OutputError(record, "cannot write output: No space left on device")

            monkeypatch.setattr(run_module, "write_json", full)
            with pytest.raises(ProvenanceError, match="only its provenance record is missing"):
                predict_file(predictor, tmp_path / "v.tif", tmp_path / "out" / "v.tif")
        else:
            predict_file(predictor, tmp_path / "v.tif", tmp_path / "out" / "v.tif")
            assert json.loads(record.read_text())["parameters"]["inference"]["threshold"] == 0.3
    assert (tmp_path / "out" / "v.tif").is_file() and not record.exists()


def test_a_replaced_file_is_never_missing(tmp_path, monkeypatch):
    # Renaming the old file aside first left a moment with no output at all; a rename onto it does not.
    target = tmp_path / "m.tif"
    target.write_text("old")
    real, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        seen.append(target.exists())
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and seen and all(seen)


def test_provenance_threads_are_those_that_ran_the_network(tmp_path):
    """With --scheduler dask the workers run the network on their own threads (dask sets
    OMP_NUM_THREADS per worker): the record gave the driver's count."""
    import torch

    from lsmseg.distributed import _worker_threads

    assert _record(tmp_path / "v.tif")["versions"]["threads"] == torch.get_num_threads()

    class Client:
        def __init__(self, replies):
            self.replies = replies

        def run(self, function):
            if isinstance(self.replies, Exception):
                raise self.replies
            return self.replies

    assert _worker_threads(Client({"tcp://a": 1, "tcp://b": 1})) == 1
    assert _worker_threads(Client({"tcp://a": 2, "tcp://b": 1})) == [1, 2]
    assert _worker_threads(Client(OSError("scheduler gone"))) is None
    from lsmseg.inference.blocks import plan_blocks
    from lsmseg.inference.results import BlockStats, provenance_record
    from lsmseg.io import Volume

    volume = Volume(data=np.zeros((4, 8, 8), np.uint8), spacing=(1.0,) * 3, path=tmp_path / "v.tif", fmt="tiff", meta={})
    record = provenance_record(tmp_path / "v.tif", tmp_path / "m.tif", volume, parameters={}, weights={},
                               stats=BlockStats.start(plan_blocks((4, 8, 8), (4, 8, 8), 0.5), None), foreground=0,
                               timings={}, threads=1)
    assert record["versions"]["threads"] == 1
