"""Property test of the readers (issue 11): random TIFF and MHA headers, corruptions and truncations
give either a volume or a one-line InputError, never another exception, and never allocate beyond
the voxel cap. Bounded for CI: a fixed number of derandomised examples, small files."""

import io as stdio
import os
import tracemalloc

import numpy as np
import psutil
import tifffile
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lsmseg import io
from lsmseg.errors import InputError

from .hostile_files import forged_tiff, metaimage

CAP = 10**6  # voxels; every file below either fits under it or must be refused before reading
MEMORY_BOUND = 200 * 2**20  # bytes: far above CAP voxels of float64 (8 MB), far below a forged size
# No shrinking phase: a failure is reported as found, so that CI time stays bounded.
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def read_all_or_refuse(path, lazy: bool) -> None:
    """Read the volume (and every voxel of a lazy one), or accept a one-line InputError."""
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()
    try:
        volume = io.read_volume(path, lazy=lazy, max_voxels=CAP)
        assert np.prod(volume.shape) <= CAP
        data = volume.load()
        assert data.shape == volume.shape
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).strip()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"numpy/python allocated {peak / 2**20:.0f} MiB"
    # ITK's allocations are not traced: bound the process's growth instead.
    assert process.memory_info().rss - rss_before < MEMORY_BOUND


def valid_tiff(shape, dtype, compression) -> bytes:
    buffer = stdio.BytesIO()
    data = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)
    tifffile.imwrite(buffer, data, compression=compression, imagej=dtype != np.int32, metadata={"axes": "ZYX"})
    return buffer.getvalue()


@BOUNDED
@given(
    shape=st.tuples(st.integers(2, 6), st.integers(1, 24), st.integers(1, 24)),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.int32]),
    compression=st.sampled_from([None, "zlib"]),
    edits=st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=4)), max_size=6),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    lazy=st.booleans(),
)
def test_random_tiff_corruptions(tmp_path, shape, dtype, compression, edits, cut, lazy):
    raw = bytearray(valid_tiff(shape, dtype, compression))
    for offset, value in edits:  # header and IFD bytes overwritten at random
        if offset < len(raw):
            raw[offset: offset + len(value)] = value
    if cut is not None:
        raw = raw[: max(1, int(len(raw) * cut))]
    path = tmp_path / "random.tif"
    path.write_bytes(bytes(raw))
    read_all_or_refuse(path, lazy)


@BOUNDED
@given(
    pages=st.integers(1, 300),
    width=st.sampled_from([1, 7, 64, 5000, 100_000, 2**31 - 1]),
    height=st.sampled_from([1, 9, 64, 5000, 100_000, 2**31 - 1]),
    compression=st.sampled_from([1, 8, 5, 32773]),
    lazy=st.booleans(),
)
def test_forged_tiff_sizes(tmp_path, pages, width, height, compression, lazy):
    read_all_or_refuse(forged_tiff(tmp_path / "forged.tif", pages, width, height, compression), lazy)


@BOUNDED
@given(
    dims=st.lists(st.sampled_from([0, 1, 3, 17, 64, 1000, 100_000, 10**7]), min_size=2, max_size=4),
    element=st.sampled_from(["MET_UCHAR", "MET_USHORT", "MET_FLOAT", "MET_DOUBLE", "MET_NONE", "BOGUS"]),
    compressed=st.booleans(),
    payload=st.integers(0, 5000),
    extra=st.sampled_from(["", "HeaderSize = -1\n", "ElementNumberOfChannels = 3\n", "NDims = 9\n",
                           "ElementSpacing = 0 -1 nan\n", "ElementByteOrderMSB = True\n"]),
    lazy=st.booleans(),
)
def test_random_mha_headers(tmp_path, dims, element, compressed, payload, extra, lazy):
    header_extra = extra + (f"CompressedData = True\nCompressedDataSize = {payload}\n" if compressed else "")
    path = metaimage(tmp_path / "random.mha", dims=dims, element=element, payload=os.urandom(payload),
                     extra=header_extra)
    read_all_or_refuse(path, lazy)
