"""What every format shares: the :class:`Volume`, the format base class, and the checks made on a
file's declared shape before any pixel is read (see docs/security.md)."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import InputError, OutputError
from .paths import volume_name

Spacing = tuple[float, float, float]
Slices = tuple[slice, ...]

# Size limits, checked on the declared shape before any pixel is read.
ENV_MAX_VOXELS = "LSMSEG_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**33  # 8.6 G voxels, e.g. 2048 x 2048 x 2048; raise with --max-voxels
# Deflate (zlib, gzip) cannot expand more than 1032:1, so a deflate-compressed file that declares
# more bytes than that is lying about its size.
DEFLATE_MAX_RATIO = 1032


@dataclass
class Volume:
    """A 3-D image (z, y, x) and what is needed to write a mask in the same container."""

    data: Any  # numpy array, or a lazy array-like (.shape, .dtype, slicing returns numpy)
    spacing: Spacing | None  # (z, y, x) in micrometres; None when the file does not say
    path: Path
    fmt: str  # registry key: "tiff", "planes", "sitk", "zarr"
    meta: dict = field(default_factory=dict)  # what the writer needs (plane names, origin, NGFF axes, ...)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def name(self) -> str:
        return volume_name(self.path)

    def load(self) -> np.ndarray:
        """The whole volume as a numpy array (reads a lazy volume into memory)."""
        return np.asarray(self.data[...]) if not isinstance(self.data, np.ndarray) else self.data


class VolumeFormat:
    """One format family: a reader and a block-wise writer (registered in :mod:`lsmseg.io.registry`).

    Writers write to exactly the path they are given (the registry hands them the hidden temporary
    name of :func:`lsmseg.io.atomic.atomic_output`). ``write`` is ``write_blocks`` with one block
    unless a format needs otherwise.
    """

    name: str = ""
    writes_folder: bool = False  # a mask in this format is a folder (planes, zarr), not a file

    def read(self, path: Path, *, lazy: bool = False, max_voxels: int | None = None) -> Volume:
        """The volume at ``path``.

        Args:
            path: the file or folder.
            lazy: return an array-like that reads on demand, where the format allows.
            max_voxels: cap on the declared size (None: :func:`default_max_voxels`).
        """
        raise NotImplementedError

    def write_blocks(
        self, blocks: Iterable[tuple[Slices, np.ndarray]], path: Path, *, shape: tuple[int, ...], dtype: np.dtype,
        like: Volume | None = None, spacing: Spacing | None = None,
    ) -> None:
        """Write a mask that arrives as ``(slices, block)`` pairs in z-major order.

        Args:
            blocks: the mask's blocks, all blocks of one z-range before the next.
            path: where to write (the caller makes it atomic).
            shape: the whole mask's shape.
            dtype: the mask's dtype.
            like: the input volume, whose container metadata the mask keeps.
            spacing: (z, y, x) in micrometres, or None.
        """
        raise NotImplementedError

    def write(self, array: np.ndarray, path: Path, *, like: Volume | None = None, spacing: Spacing | None = None) -> None:
        """Write a whole array (arguments as in :meth:`write_blocks`)."""
        whole = tuple(slice(0, s) for s in array.shape)
        self.write_blocks([(whole, array)], path, shape=array.shape, dtype=array.dtype, like=like, spacing=spacing)


class LazyArray:
    """Read-only view of a lazily read array (a zarr array, or tifffile's zarr view of a TIFF).

    Read errors become one-line :class:`InputError`\\ s naming the file: a corrupt strip or chunk
    shows only when it is read. ``index`` drops length-1 axes other than Z, Y and X (ImageJ writes
    T=1, C=1): an int for a dropped axis, ``slice(None)`` for a kept one.
    """

    def __init__(self, array, path: Path, what: str, index: tuple | None = None):
        self._array, self.path, self.what = array, path, what
        self._index = index if index is not None else (slice(None),) * len(array.shape)
        self.shape = tuple(int(s) for s, i in zip(array.shape, self._index) if not isinstance(i, int))
        self.dtype, self.ndim = np.dtype(array.dtype), len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if any(isinstance(i, int) for i in self._index):  # map the key onto the kept axes
            if key is Ellipsis:
                key = (slice(None),) * self.ndim
            if not isinstance(key, tuple):
                key = (key,)
            rest = iter(key + (slice(None),) * (self.ndim - len(key)))
            key = tuple(i if isinstance(i, int) else next(rest) for i in self._index)
        try:
            return np.asarray(self._array[key])
        except (MemoryError, InputError):
            raise
        except Exception as exc:
            settle_zarr_reads()
            raise InputError(self.path, f"cannot read {self.what} ({type(exc).__name__}: {exc})") from exc

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


def settle_zarr_reads(timeout: float = 5.0) -> None:
    """Let the chunk reads still running on zarr's event loop finish after one of them failed.

    zarr reads a selection's chunks concurrently and re-raises the first failure while the others
    are still pending; if the process ends before they finish, zarr's exit handler closes its loop
    under them and Python prints hundreds of lines of "Task was destroyed but it is pending!"
    after the one-line error. Their own failures stay unreported (zarr's gather takes them). The loop
    is shared (other threads' reads run on it too), so the wait is bounded by ``timeout`` seconds:
    chunk reads take milliseconds.
    """
    import sys

    if "zarr.core.sync" not in sys.modules:
        return
    import asyncio

    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed():
        return

    async def others_done() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    try:
        zarr_sync.sync(others_done(), loop=loop, timeout=timeout + 1)
    except Exception:  # tidying only: the read error is what gets reported
        pass


def iter_slabs(blocks, shape: tuple[int, ...], dtype=np.uint8) -> Iterator[tuple[int, np.ndarray]]:
    """Assemble z-major blocks into complete z-slabs; yield ``(z_start, slab)``.

    Blocks must come in z-major order (all blocks of one z-range before the next), which is the
    order :func:`lsmseg.inference.blocks.plan_blocks` produces; only one slab is held at a time.
    """
    slab, slab_start, filled = None, None, 0

    def complete():
        if filled != slab.size:
            raise RuntimeError(f"z-slab at {slab_start} is incomplete ({filled} of {slab.size} voxels)")
        return slab_start, slab

    for index, block in blocks:
        z = index[0]
        if slab is None or z.start != slab_start:
            if slab is not None:
                yield complete()
            slab_start, filled = z.start, 0
            slab = np.zeros((z.stop - z.start, *shape[1:]), dtype=dtype)
        slab[(slice(0, z.stop - z.start), *index[1:])] = block
        filled += block.size
    if slab is not None:
        yield complete()


# --------------------------------------------------------------------------------------------
# Checks shared by every reader


def default_max_voxels() -> int:
    """The voxel cap: ``LSMSEG_MAX_VOXELS`` if set, else :data:`DEFAULT_MAX_VOXELS`."""
    value = os.environ.get(ENV_MAX_VOXELS)
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        cap = int(float(value))
    except ValueError:
        raise InputError(ENV_MAX_VOXELS, f"expected a positive voxel count, got {value!r}") from None
    if cap < 1:
        raise InputError(ENV_MAX_VOXELS, f"expected a positive voxel count, got {value!r}")
    return cap


def check_declared_size(
    path: Path, shape, itemsize: int, max_voxels: int | None, *,
    stored_bytes: int | None = None, deflate_bytes: int | None = None, what: str = "image",
    way_out: str | None = None,
) -> None:
    """Refuse a declared shape before reading: above the voxel cap, or more data than the file holds.

    Args:
        path: the file (named in the error).
        shape: the declared shape (any number of axes).
        itemsize: bytes per voxel as stored (a fraction for packed bits: 1/8 for a bilevel TIFF).
        max_voxels: the cap (None: :func:`default_max_voxels`).
        stored_bytes: for uncompressed data, the bytes the file actually holds for the pixels.
        deflate_bytes: for deflate-compressed data, the compressed bytes available.
        what: what the shape describes, for the message.
        way_out: another way out than raising the cap, added to the message (e.g. not resampling).
    """
    cap = default_max_voxels() if max_voxels is None else int(max_voxels)
    voxels = math.prod(int(s) for s in shape)
    shown = " x ".join(str(int(s)) for s in shape)
    if voxels > cap:
        raise InputError(
            path, f"{what} declares {shown} = {voxels:,} voxels, above the limit of {cap:,} "
            f"(--max-voxels / {ENV_MAX_VOXELS}{'; or ' + way_out if way_out else ''})",
        )
    nbytes = math.ceil(voxels * itemsize) if 0 < itemsize < 1 else voxels * max(int(itemsize), 1)
    if stored_bytes is not None and nbytes > stored_bytes:
        raise InputError(
            path, f"{what} declares {shown} voxels ({nbytes:,} bytes) but the file holds only {stored_bytes:,} "
            "bytes of pixel data (truncated or forged header)",
        )
    if deflate_bytes is not None and nbytes > DEFLATE_MAX_RATIO * max(deflate_bytes, 1):
        raise InputError(
            path, f"{what} declares {shown} voxels ({nbytes:,} bytes), more than {deflate_bytes:,} compressed bytes "
            "can hold (forged header)",
        )


def check_output_space(path: str | Path, shape, bytes_per_voxel: float = 1 / 8) -> None:
    """Refuse a mask that cannot fit on the output's file system, before any work.

    The estimate is one bit per voxel: masks are written compressed (TIFF zlib, MHA/NIfTI gzip,
    zarr blosc/zstd), and binary masks of real structures compress below that.

    Args:
        path: the mask's path (its nearest existing folder is measured).
        shape: the mask's shape.
        bytes_per_voxel: the estimated size per voxel.
    """
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), None)
    if folder is None:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    need = int(math.prod(int(s) for s in shape) * bytes_per_voxel)
    if need > free:
        raise OutputError(
            path, f"not enough free disk space for the mask ({need / 1e9:.2f} GB estimated, {free / 1e9:.2f} GB free)"
        )


def check_array_shape(path: Path, shape: tuple, axes: str | None = None) -> None:
    """Reject what is not a single-channel 3-D volume, with a message saying what it is."""
    if axes:
        for axis_name in ("C", "S"):
            if axis_name in axes and shape[axes.index(axis_name)] > 1:
                raise InputError(
                    path,
                    f"multi-channel image (axes {axes}, shape {tuple(shape)}); expected one channel: "
                    "split the channels into separate volumes",
                )
    if len(shape) == 2:
        raise InputError(path, f"2-D image of shape {tuple(shape)}; expected a 3-D volume (z, y, x)")
    if len(shape) == 4 and shape[-1] in (3, 4):
        raise InputError(path, f"RGB/multi-channel volume of shape {tuple(shape)}; expected one channel")
    if len(shape) != 3:
        raise InputError(path, f"{len(shape)}-D image of shape {tuple(shape)}; expected a 3-D volume (z, y, x)")
    if min(shape) < 1:
        raise InputError(path, f"empty image of shape {tuple(shape)}")


def check_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse pixel types that are not intensities (complex, strings, records)."""
    if dtype.kind not in "uifb":
        raise InputError(path, f"unsupported pixel type {dtype}; expected integer or float intensities")


# Units of spacing metadata (OME-XML, ImageJ, NGFF) in micrometres.
_UNIT_TO_UM = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "m": 1e6, "meter": 1e6, "å": 1e-4, "angstrom": 1e-4, "pixel": 1.0,
    "pm": 1e-6, "dm": 1e5, "micrometre": 1.0, "nanometre": 1e-3, "millimetre": 1e3, "centimetre": 1e4, "metre": 1e6,
    # ImageJ writes "inch" for images calibrated in inches (its default for scanned pictures); OME says "in".
    "in": 25400.0, "inch": 25400.0, "inches": 25400.0, "thou": 25.4,
}


def to_um(value, unit) -> float | None:
    """``value`` in ``unit`` as micrometres; None for an unknown unit or a non-positive value."""
    scale = _UNIT_TO_UM.get(str(unit if unit is not None else "um").strip().lower())
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if scale is None or not math.isfinite(value) or value <= 0:
        return None
    return value * scale
