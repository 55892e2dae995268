"""How the process's C allocator hands out large buffers during prediction.

Block-wise prediction allocates and frees many large arrays of changing sizes: each block's input
region and accumulators, batches of windows, the window cache's kept parts. glibc's malloc serves
buffers above its mmap threshold straight from the operating system, but it raises that threshold
(up to 32 MiB) each time such a buffer is freed, so that later ones come from the heap, where
space freed by one size is often not reusable by the next and stays counted in the process's
memory. A fixed threshold of 1 MiB keeps the large buffers out of the heap: with the
convolutional stand-in of ``benchmarks/bench_scaling.py`` (256x512x512 in 64 blocks) peak RSS fell
from 791-854 MB to 680-684 MB (benchmarks/README.md, "Large buffers mapped, not heaped").

``lsmseg predict``, ``challenge`` and ``serve`` call :func:`map_large_buffers_for` once the model is
loaded; training does not.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
# 1 MiB: block regions, accumulators and batches of windows are mapped; single windows (512 KiB
# for 32x64x64 float32) and small objects stay in the heap. 128 KiB (glibc's starting value) took
# 2 % more off but maps every window anew; 4 MiB and up left the slack where it was.
DEFAULT_MMAP_THRESHOLD = 1 << 20
# Bytes of the fixed threshold; 0 leaves malloc as glibc sets it.
ENV_MMAP_THRESHOLD = "LSMSEG_MMAP_THRESHOLD"


def map_large_buffers(threshold: int | None = None) -> bool:
    """Have glibc's malloc give every buffer of at least ``threshold`` bytes its own memory mapping,
    returned to the system when freed, for the rest of the process. True if set.

    Does nothing (False) off Linux, with a C library other than glibc, when ``threshold`` is 0, or
    when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or a ``GLIBC_TUNABLES`` mmap threshold
    (their choice wins).

    Args:
        threshold: the fixed mmap threshold in bytes; default ``LSMSEG_MMAP_THRESHOLD`` from the
            environment, else :data:`DEFAULT_MMAP_THRESHOLD`.
    """
    if threshold is None:
        text = os.environ.get(ENV_MMAP_THRESHOLD, "")
        try:
            threshold = int(text) if text.strip() else DEFAULT_MMAP_THRESHOLD
        except ValueError:
            threshold = DEFAULT_MMAP_THRESHOLD  # a malformed value must not stop a prediction
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)  # the running process's own symbols: its C library
        if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt does nothing
            return False
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(min(int(threshold), 2**31 - 1))))
    except (OSError, AttributeError):
        return False


def map_large_buffers_for(predictor) -> bool:
    """:func:`map_large_buffers`, unless ``predictor``'s network runs in PyTorch on the CPU. True if set.

    PyTorch on the CPU allocates its activations with malloc on every call: mapped, each would be
    zeroed by the system anew (``lsmseg-torch`` took 19 % more CPU time on the vesselNN crop of
    ``benchmarks/bench_seed.py``), while OpenVINO (no cost measured) and ONNX Runtime reuse their
    own buffers and CUDA keeps activations on the GPU.

    Args:
        predictor: a loaded :class:`lsmseg.inference.Predictor` (its ``engine`` and ``device``).
    """
    if predictor.engine == "torch" and predictor.device.type == "cpu":
        return False
    return map_large_buffers()
