"""The one volume reader/writer registry, shared by inference, training and evaluation.

Every format maps a path to a :class:`Volume` (a 3-D array in z, y, x order, lazy where the format
allows, plus voxel spacing in micrometres) and writes a mask back *in the same container* as its
input, so that ``brain01.tif`` gives ``brain01.tif``, a folder of planes gives a folder of planes with
the same plane names, and ``x.nii.gz`` gives ``x.nii.gz`` with the input's spacing and orientation.

Writers never leave a half-written file: they write to a hidden temporary name beside the target
and rename it into place only when complete (see :func:`atomic_output`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import InputError, OutputError

logger = logging.getLogger(__name__)


def _tifffile_to_debug(record: logging.LogRecord) -> bool:
    """tifffile logs what it finds wrong in a file at ERROR level (``invalid page offset``) and
    then raises or recovers; the reader reports the file in one ``ERROR: <file>: <reason>`` line,
    so tifffile's own lines are kept for debugging (``--verbose``) only."""
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logger.isEnabledFor(logging.DEBUG)


logging.getLogger("tifffile").addFilter(_tifffile_to_debug)

Spacing = tuple[float, float, float]

TIFF_SUFFIXES = (".tif", ".tiff")
SITK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
# Longest first, so that "x.ome.tif" loses ".ome.tif" and not just ".tif".
KNOWN_SUFFIXES = tuple(
    sorted((".ome.tif", ".ome.tiff", *TIFF_SUFFIXES, *SITK_SUFFIXES, *ZARR_SUFFIXES), key=len, reverse=True)
)
PARTIAL_PREFIX = ".partial-"

# Size limits, checked on the declared shape before any pixel is read (see docs/security.md).
ENV_MAX_VOXELS = "LSMSEG_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**33  # 8.6 G voxels, e.g. 2048 x 2048 x 2048; raise with --max-voxels
MAX_TIFF_PAGES = 100_000  # more IFDs than any real z-stack; counted without parsing them
# Deflate (zlib, gzip) cannot expand more than 1032:1, so a deflate-compressed file that declares
# more bytes than that is lying about its size.
DEFLATE_MAX_RATIO = 1032


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
) -> None:
    """Refuse a declared shape before reading: above the voxel cap, or more data than the file holds.

    Args:
        path: the file (named in the error).
        shape: the declared shape (any number of axes).
        itemsize: bytes per voxel as stored.
        max_voxels: the cap (None: :func:`default_max_voxels`).
        stored_bytes: for uncompressed data, the bytes the file actually holds for the pixels.
        deflate_bytes: for deflate-compressed data, the compressed bytes available.
        what: what the shape describes, for the message.
    """
    cap = default_max_voxels() if max_voxels is None else int(max_voxels)
    voxels = math.prod(int(s) for s in shape)
    shown = " x ".join(str(int(s)) for s in shape)
    if voxels > cap:
        raise InputError(
            path, f"{what} declares {shown} = {voxels:,} voxels, above the limit of {cap:,} "
            f"(--max-voxels / {ENV_MAX_VOXELS})",
        )
    nbytes = voxels * max(int(itemsize), 1)
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


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (by resolved path, or by inode when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(pairs) -> None:
    """Raise :class:`OutputError` when an output would replace (or sit inside) one of the inputs.

    ``pairs`` is ``[(input, output), ...]``; every output is checked against every input, so that
    ``predict d/a.tif -o d`` and folder mode with the same input and output folder are refused
    before any work.
    """
    pairs = [(Path(i), Path(o)) for i, o in pairs]
    inputs = [i for i, _ in pairs]
    for _, output in pairs:
        for input_path in inputs:
            if same_file(input_path, output):
                raise OutputError(output, f"output would overwrite the input {input_path}; choose another output folder")
            if input_path.is_dir() and os.path.realpath(output).startswith(os.path.realpath(input_path) + os.sep):
                raise OutputError(output, f"output would be written inside the input {input_path}; choose another output folder")


@dataclass
class Volume:
    """A 3-D image (z, y, x) and what is needed to write a mask in the same container."""

    data: Any  # numpy array, or a lazy array-like (.shape, .dtype, slicing returns numpy)
    spacing: Spacing | None  # (z, y, x) in micrometres; None when the file does not say
    path: Path
    fmt: str  # "tiff", "planes", "sitk", "zarr"
    meta: dict = field(default_factory=dict)

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


# --------------------------------------------------------------------------------------------
# Naming helpers


def _natural_key(name: str) -> list:
    """Sort key so that z2 comes before z10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def natural_sorted(paths) -> list[Path]:
    return sorted((Path(p) for p in paths), key=lambda p: _natural_key(p.name))


def _known_suffix(path: Path) -> str:
    lower = path.name.lower()
    for suffix in KNOWN_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return ""


def volume_name(path: str | Path) -> str:
    """Base name of a volume without its format suffix: ``brain01`` for ``brain01.nii.gz``."""
    path = Path(path)
    suffix = _known_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def output_path_for(input_path: str | Path, out_dir: str | Path) -> Path:
    """The challenge convention: same base name, same container format, in ``out_dir``."""
    return Path(out_dir) / Path(input_path).name


# --------------------------------------------------------------------------------------------
# Atomic output


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the target's suffix (writers choose the format by suffix) and starts
    with ``.partial-`` so that a crash leaves only an obviously unfinished hidden file, which is
    removed on any exception.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path.parent, f"cannot create output folder: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise OutputError(path.parent, "output folder is not writable")
    tmp = path.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, (InputError, OutputError)):
            raise OutputError(path, f"cannot write output: {exc.strerror or exc}") from exc
        raise


_PARTIAL_PID = re.compile(re.escape(PARTIAL_PREFIX) + r"(\d+)-[0-9a-f]{8}-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: str | Path, stale_after_s: float = 3600.0) -> list[Path]:
    """Remove ``.partial-*`` leftovers of killed runs from ``folder``; return what was removed.

    A partial name carries its writer's pid: it is stale when that process is gone or is this one
    (called before this process writes). Names without a pid (older versions) are stale once
    untouched for ``stale_after_s``. Runs on other hosts sharing the folder are not seen.
    """
    import time

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(PARTIAL_PREFIX):
            continue
        match = _PARTIAL_PID.match(entry.name)
        if match:
            pid = int(match.group(1))
            stale = pid == os.getpid() or not _pid_alive(pid)
        else:
            try:
                stale = time.time() - entry.lstat().st_mtime > stale_after_s
            except OSError:
                continue
        if stale:
            _remove(entry)
            removed.append(entry)
            logger.info("removed %s (left by an interrupted run)", entry)
    return removed


# --------------------------------------------------------------------------------------------
# Validation shared by every reader


def _check_array_shape(path: Path, shape: tuple, axes: str | None = None) -> None:
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


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if dtype.kind not in "uifb":
        raise InputError(path, f"unsupported pixel type {dtype}; expected integer or float intensities")


def _squeeze_axes(shape: tuple, axes: str) -> tuple[tuple, str, tuple]:
    """Drop length-1 axes other than Z/Y/X (ImageJ writes T=1, C=1); return the index to apply."""
    index, kept_shape, kept_axes = [], [], []
    for size, axis in zip(shape, axes):
        if size == 1 and axis not in "ZYX":
            index.append(0)
        else:
            index.append(slice(None))
            kept_shape.append(size)
            kept_axes.append(axis)
    return tuple(kept_shape), "".join(kept_axes), tuple(index)


# --------------------------------------------------------------------------------------------
# TIFF stacks

_UNIT_TO_UM = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "m": 1e6, "meter": 1e6, "å": 1e-4, "angstrom": 1e-4, "pixel": 1.0,
}


def _to_um(value, unit) -> float | None:
    """``value`` in ``unit`` as micrometres; None for an unknown unit or a non-positive value."""
    scale = _UNIT_TO_UM.get(str(unit if unit is not None else "um").strip().lower())
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if scale is None or not math.isfinite(value) or value <= 0:
        return None
    return value * scale


def count_tiff_pages(path: Path, limit: int) -> int:
    """Number of IFDs (pages) in a TIFF, walking only the IFD chain; stops counting at ``limit + 1``.

    tifffile parses every page of a generic multi-page file into objects (minutes and GBs for a
    forged file of 300 000 tiny pages); following the offsets alone costs a few bytes per page.
    """
    import struct

    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:2] not in (b"II", b"MM"):
            raise InputError(path, "not a TIFF file (bad byte-order mark)")
        end = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(end + "H", head[2:4])[0]
        if version == 42:
            offset = struct.unpack(end + "I", head[4:8])[0]
            count_fmt, count_size, entry_size, next_fmt, next_size = "H", 2, 12, "I", 4
        elif version == 43:
            offset = struct.unpack(end + "Q", head[8:16])[0]
            count_fmt, count_size, entry_size, next_fmt, next_size = "Q", 8, 20, "Q", 8
        else:
            raise InputError(path, f"not a TIFF file (version {version})")
        size = os.fstat(fh.fileno()).st_size
        seen, pages = set(), 0
        while offset and pages <= limit:
            if offset in seen or offset + count_size > size:
                break  # a loop or a dangling offset ends the chain (tifffile does the same)
            seen.add(offset)
            fh.seek(offset)
            raw = fh.read(count_size)
            if len(raw) < count_size:
                break
            entries = struct.unpack(end + count_fmt, raw)[0]
            fh.seek(offset + count_size + entries * entry_size)
            raw = fh.read(next_size)
            pages += 1
            if len(raw) < next_size:
                break
            offset = struct.unpack(end + next_fmt, raw)[0]
    return pages


def _ome_spacing(tif) -> Spacing | None:
    """Voxel spacing from OME-XML ``Pixels`` PhysicalSize{Z,Y,X} (with their units), in micrometres."""
    import tifffile

    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except Exception:  # malformed OME-XML: spacing is optional
        return None
    values = [_to_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm")) for a in "ZYX"]
    return None if None in values else tuple(values)  # type: ignore[return-value]


def _tiff_metadata(tif) -> tuple[Spacing | None, dict]:
    """Voxel spacing in micrometres (OME-XML, else ImageJ z spacing and resolution tags), and what
    a mask needs to keep when the z spacing is unknown (the XY resolution and its unit)."""
    if tif.is_ome:
        spacing = _ome_spacing(tif)
        if spacing is not None:
            return spacing, {}
    # ImageJ metadata, or tifffile's own JSON description for dtypes ImageJ cannot hold.
    ij = tif.imagej_metadata or (tif.shaped_metadata[0] if tif.shaped_metadata else None) or {}
    page = tif.pages.first
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        x = xres[1] / xres[0]
        y = yres[1] / yres[0]
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None, {}
    unit = str(ij.get("unit", "um"))
    z = ij.get("spacing")
    if z is None:
        # No z spacing: the volume's spacing is unknown, but the XY resolution goes back into the mask.
        if ij:  # an ImageJ/tifffile description says the resolution is per unit, not per inch
            return None, {"xy_resolution": (float(y), float(x)), "unit": unit}
        return None, {}
    values = [_to_um(v, unit) for v in (z, y, x)]
    return (None, {}) if None in values else (tuple(values), {})  # type: ignore[return-value]


def _tiff_spacing(tif) -> Spacing | None:
    return _tiff_metadata(tif)[0]


class _LazyTiff:
    """Read-only array view of a (possibly compressed) TIFF series, read on demand through zarr."""

    def __init__(self, path: Path, index: tuple):
        import tifffile
        import zarr

        self.path = path
        self._tif = tifffile.TiffFile(path)
        self._array = zarr.open(self._tif.series[0].aszarr(), mode="r")
        self._index = index  # 0 for squeezed length-1 axes, slice(None) for kept ones
        self.shape = tuple(s for s, i in zip(self._array.shape, index) if not isinstance(i, int))
        self.dtype = np.dtype(self._array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if key is Ellipsis:
            key = (slice(None),) * self.ndim
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        full, it = [], iter(key)
        for i in self._index:
            full.append(i if isinstance(i, int) else next(it))
        try:
            return np.asarray(self._array[tuple(full)])
        except MemoryError:
            raise
        except Exception as exc:  # a corrupt strip shows only when it is read: one line, not a traceback
            raise InputError(self.path, f"cannot read TIFF pixel data ({type(exc).__name__}: {exc})") from exc

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


class _GuardedArray:
    """A lazy array whose read errors become one-line :class:`InputError`s naming the file."""

    def __init__(self, array, path: Path, what: str):
        self._array, self.path, self.what = array, path, what
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), len(array.shape)

    def __getitem__(self, key) -> np.ndarray:
        try:
            return np.asarray(self._array[key])
        except MemoryError:
            raise
        except Exception as exc:
            raise InputError(self.path, f"cannot read {self.what} ({type(exc).__name__}: {exc})") from exc

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


_TIFF_DEFLATE = (8, 32946)  # ADOBE_DEFLATE, DEFLATE


def _check_tiff_size(path: Path, tif, shape: tuple, dtype: np.dtype, max_voxels: int | None) -> None:
    """The declared series shape against the cap, and against the bytes the strips hold."""
    page = tif.pages.first
    check_declared_size(path, shape, dtype.itemsize, max_voxels, what="TIFF")
    compression = int(getattr(page, "compression", 1))
    pages = len(tif.pages)
    # Each page's strips/tiles are counted once: forged files point many pages at the same data.
    spans = set()
    for p in (tif.pages[i] for i in range(min(pages, 4))):
        spans.update(zip(p.dataoffsets, p.databytecounts))
    per_page = sum(b for _, b in spans) / max(min(pages, 4), 1)
    stored = int(min(per_page * pages, os.path.getsize(path)))
    if compression == 1:
        check_declared_size(path, shape, dtype.itemsize, max_voxels, stored_bytes=os.path.getsize(path), what="TIFF")
    elif compression in _TIFF_DEFLATE:
        check_declared_size(path, shape, dtype.itemsize, max_voxels, deflate_bytes=stored, what="TIFF")


def _read_tiff(path: Path, lazy: bool, max_voxels: int | None = None) -> Volume:
    import tifffile

    try:
        pages = count_tiff_pages(path, MAX_TIFF_PAGES)
        if pages > MAX_TIFF_PAGES:
            raise InputError(path, f"TIFF has more than {MAX_TIFF_PAGES:,} pages; refusing to parse it")
        if pages == 0:
            raise InputError(path, "cannot read TIFF: no readable image (corrupt or truncated file)")
        with tifffile.TiffFile(path) as tif:
            first = tif.pages.first
            # One page's size first: a forged page of 10^10 pixels must not reach the allocator.
            check_declared_size(path, first.shaped, np.dtype(first.dtype or np.uint8).itemsize, max_voxels,
                                what="TIFF page")
            check_declared_size(path, (pages, *first.shape), np.dtype(first.dtype or np.uint8).itemsize,
                                max_voxels, what="TIFF")
            if not tif.series:
                raise InputError(path, "cannot read TIFF: no readable image (corrupt or truncated file)")
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            spacing, extra = _tiff_metadata(tif)
            dtype = np.dtype(series.dtype)
            _check_tiff_size(path, tif, shape, dtype, max_voxels)
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InputError(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    kept_shape, kept_axes, index = _squeeze_axes(shape, axes)
    _check_array_shape(path, kept_shape, kept_axes)
    _check_dtype(path, dtype)
    meta = {"axes": kept_axes, **extra}
    try:
        if lazy:
            data = _LazyTiff(path, index)
        else:
            data = tifffile.imread(path, series=0)[index]
    except Exception as exc:
        raise InputError(path, f"cannot read TIFF pixel data ({type(exc).__name__}: {exc})") from exc
    return Volume(data=data, spacing=spacing, path=path, fmt="tiff", meta=meta)


IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def _is_ome_name(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def _tiff_write_kwargs(spacing: Spacing | None, dtype: np.dtype, like: "Volume | None" = None, ome: bool = False) -> dict:
    """tifffile arguments that keep the spacing: OME-XML for ``.ome.tif``, else ImageJ metadata.

    When the input's z spacing was unknown, its XY resolution (and unit) is still written back.
    """
    if ome:
        metadata: dict = {"axes": "ZYX"}
        if spacing is not None:
            for axis, value in zip("ZYX", spacing):
                metadata[f"PhysicalSize{axis}"] = float(value)
                metadata[f"PhysicalSize{axis}Unit"] = "µm"
        return {"compression": "zlib", "imagej": False, "ome": True, "metadata": metadata}
    imagej = np.dtype(dtype) in [np.dtype(d) for d in IMAGEJ_DTYPES]
    kwargs: dict = {"compression": "zlib", "imagej": imagej, "metadata": {"axes": "ZYX"}}
    if spacing is not None:
        kwargs["resolution"] = (1.0 / spacing[2], 1.0 / spacing[1])
        kwargs["metadata"].update(spacing=spacing[0], unit="um")
    elif like is not None and like.meta.get("xy_resolution"):
        y, x = like.meta["xy_resolution"]
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["metadata"].update(unit=like.meta.get("unit", "um"))
    return kwargs


def _write_tiff(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    import tifffile

    tifffile.imwrite(path, mask, **_tiff_write_kwargs(spacing, mask.dtype, like, ome=_is_ome_name(path)))


# --------------------------------------------------------------------------------------------
# Folders of 2-D planes

PLANE_SUFFIXES = TIFF_SUFFIXES


def _plane_files(folder: Path) -> list[Path]:
    return natural_sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PLANE_SUFFIXES and not p.name.startswith(".")
    )


def _check_plane_sequence(folder: Path, planes: list[Path]) -> None:
    """A numbered plane sequence with a gap means a plane is missing: refuse, naming it."""
    numbers = []
    for plane in planes:
        match = re.search(r"(\d+)(?!.*\d)", plane.stem)
        if match is None:
            return  # not a numbered sequence; nothing to check
        numbers.append(int(match.group(1)))
    if len(set(numbers)) != len(numbers) or len(numbers) < 2:
        return
    # Numbering may step by more than one (z0000, z0005, ...): the common step is the gcd.
    step = math.gcd(*(b - a for a, b in zip(sorted(numbers), sorted(numbers)[1:])))
    expected = set(range(min(numbers), max(numbers) + 1, step))
    missing = sorted(expected - set(numbers))
    if missing:
        shown = ", ".join(str(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(folder, f"plane sequence has {len(missing)} missing plane number(s): {shown}")


class PlaneStack:
    """Lazy 3-D view of a folder of 2-D planes: only the planes a slice touches are read."""

    def __init__(self, folder: Path, planes: list[Path], max_voxels: int | None = None):
        import tifffile

        self.folder, self.planes = folder, planes
        shapes, dtypes = {}, {}
        for plane in planes:
            try:
                if count_tiff_pages(plane, 1) > 1:
                    raise InputError(
                        folder, f"holds multi-page TIFF stacks ({plane.name} has more than one page), not 2-D planes; "
                        "pass each stack as a volume of its own",
                    )
                with tifffile.TiffFile(plane) as tif:
                    page = tif.pages[0]
                    shapes[plane.name] = tuple(page.shape)
                    dtypes[plane.name] = np.dtype(page.dtype)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(plane, f"cannot read TIFF plane ({type(exc).__name__}: {exc})") from exc
        first = planes[0].name
        for name, shape in shapes.items():
            if shape != shapes[first]:
                raise InputError(folder, f"planes differ in shape: {first} is {shapes[first]}, {name} is {shape}")
            if dtypes[name] != dtypes[first]:
                raise InputError(folder, f"planes differ in type: {first} is {dtypes[first]}, {name} is {dtypes[name]}")
        if len(shapes[first]) != 2:
            raise InputError(planes[0], f"plane of shape {shapes[first]} is not a single-channel 2-D image")
        self.shape = (len(planes), *shapes[first])
        self.dtype = dtypes[first]
        self.ndim = 3
        check_declared_size(folder, self.shape, self.dtype.itemsize, max_voxels, what="plane folder")

    def _read(self, index: int) -> np.ndarray:
        import tifffile

        try:
            return tifffile.imread(self.planes[index])
        except MemoryError:
            raise
        except Exception as exc:  # read lazily: a corrupt plane shows here, as one line
            raise InputError(self.planes[index], f"cannot read TIFF plane ({type(exc).__name__}: {exc})") from exc

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if key is Ellipsis:
            key = (slice(None),)
        if not isinstance(key, tuple):
            key = (key,)
        z_key, rest = key[0], key[1:]
        if isinstance(z_key, (int, np.integer)):
            return self._read(z_key)[rest] if rest else self._read(z_key)
        indices = range(*z_key.indices(self.shape[0]))
        out = [self._read(i)[rest] if rest else self._read(i) for i in indices]
        if not out:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.stack(out)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


def _read_planes(path: Path, lazy: bool, max_voxels: int | None = None) -> Volume:
    planes = _plane_files(path)
    if not planes:
        raise InputError(path, "folder contains no .tif/.tiff planes")
    _check_plane_sequence(path, planes)
    stack = PlaneStack(path, planes, max_voxels)
    _check_dtype(path, stack.dtype)
    spacing, extra = None, {}
    try:
        import tifffile

        with tifffile.TiffFile(planes[0]) as tif:
            spacing, extra = _tiff_metadata(tif)
    except Exception:  # spacing is optional metadata; the planes themselves were checked above
        spacing, extra = None, {}
    meta = {"plane_names": [p.name for p in planes], **extra}
    data = stack if lazy else stack[...]
    return Volume(data=data, spacing=spacing, path=path, fmt="planes", meta=meta)


def _write_planes(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    import tifffile

    names = (like.meta.get("plane_names") if like is not None else None) or [
        f"z{index:05d}.tif" for index in range(mask.shape[0])
    ]
    if len(names) != mask.shape[0]:
        raise OutputError(path, f"mask has {mask.shape[0]} planes but the input had {len(names)}")
    path.mkdir(parents=True)
    kwargs = _tiff_write_kwargs(spacing, mask.dtype, like)
    kwargs["metadata"] = {k: v for k, v in kwargs["metadata"].items() if k != "axes"} | {"axes": "YX"}
    for index, name in enumerate(names):
        tifffile.imwrite(path / name, mask[index], **kwargs)


# --------------------------------------------------------------------------------------------
# NIfTI / MHA / NRRD through SimpleITK


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_nonfinite(path: Path, shape: tuple) -> np.ndarray | None:
    """Where a float NIfTI file holds NaN/Inf, read from its raw data (None: none, or not float).

    ITK's NIfTI reader replaces NaN with 0, which would let a damaged volume pass as a valid one;
    reading the raw voxels lets the caller see what the file really holds.
    """
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
        for endian in ("<", ">"):
            size = struct.unpack(endian + "i", header[:4])[0]
            if size == 348:  # NIfTI-1
                datatype = struct.unpack(endian + "h", header[70:72])[0]
                offset = int(struct.unpack(endian + "f", header[108:112])[0])
                break
            if size == 540:  # NIfTI-2
                datatype = struct.unpack(endian + "h", header[12:14])[0]
                offset = struct.unpack(endian + "q", header[168:176])[0]
                break
        else:
            return None
        if datatype not in _NIFTI_FLOAT_TYPES:
            return None
        handle.seek(offset)
        raw = np.frombuffer(handle.read(), dtype=endian + _NIFTI_FLOAT_TYPES[datatype], count=int(np.prod(shape)))
    nonfinite = ~np.isfinite(raw)
    return nonfinite.reshape(shape) if nonfinite.any() else None


_HEADER_LIMIT = 1 << 16  # header text read before handing a file to ITK


def _header_text(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(_HEADER_LIMIT).decode("latin-1")


def _metaimage_fields(path: Path) -> dict[str, str]:
    """``Key = Value`` fields of a MetaImage header, up to ``ElementDataFile`` (which ends it)."""
    fields: dict[str, str] = {}
    for line in _header_text(path).splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lower()
        fields[key] = value.strip()
        if key == "elementdatafile":
            break
    return fields


def _nrrd_fields(path: Path) -> dict[str, str]:
    """``key: value`` fields of a NRRD header (up to the blank line that ends it)."""
    text = _header_text(path)
    if not text.startswith("NRRD"):
        raise InputError(path, "cannot read image (no NRRD magic)")
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line.strip():
            break
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep and not value.startswith("="):  # "key:=value" lines are key/value pairs, not fields
            fields[key.strip().lower()] = value.strip()
    return fields


def _confined_data_file(path: Path, name: str) -> Path:
    """A detached data file named by a header: one plain name that resolves inside the header's folder."""
    if not name or name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        raise InputError(path, f"data file '{name[:80]}' is a list or pattern of files; only one data file is supported")
    folder = os.path.realpath(path.parent)
    target = os.path.realpath(os.path.join(folder, name))
    if os.path.isabs(name) or not target.startswith(folder + os.sep):
        raise InputError(path, f"data file '{name[:80]}' lies outside the header's folder; refusing to read it")
    if not os.path.isfile(target):
        raise InputError(path, f"data file '{name[:80]}' is missing or not a regular file")
    return Path(target)


def _sitk_data_source(path: Path) -> tuple[Path, bool]:
    """Where the pixels of an ITK file are and whether they are deflate-compressed, checked for
    confinement from the header text itself before ITK sees the file.

    ``.mha`` must hold its pixels (``ElementDataFile = LOCAL``); ``.mhd``/``.nhdr`` (and a
    detached ``.nrrd``) may name one data file, inside the header's own folder.
    """
    lower = path.name.lower()
    if lower.endswith((".mha", ".mhd")):
        fields = _metaimage_fields(path)
        data_file = fields.get("elementdatafile")
        if data_file is None:
            raise InputError(path, "cannot read image (MetaImage header has no ElementDataFile)")
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if data_file.upper() == "LOCAL":
            return path, compressed
        if lower.endswith(".mha"):
            raise InputError(path, f"an .mha file must hold its own pixels (ElementDataFile = LOCAL), not '{data_file[:80]}'")
        return _confined_data_file(path, data_file), compressed
    if lower.endswith((".nrrd", ".nhdr")):
        fields = _nrrd_fields(path)
        data_file = fields.get("data file", fields.get("datafile"))
        compressed = fields.get("encoding", "raw").lower() in ("gzip", "gz")
        if data_file is None:
            if lower.endswith(".nhdr"):
                raise InputError(path, "NRRD header has no 'data file' field")
            return path, compressed
        return _confined_data_file(path, data_file), compressed
    return path, lower.endswith(".gz")


def _check_sitk_size(path: Path, max_voxels: int | None) -> None:
    """Confine the data file, then check the declared size (ITK reads only the header here)."""
    import SimpleITK as sitk

    source, compressed = _sitk_data_source(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        first_line = next((line for line in str(exc).splitlines() if "ERROR" in line or "error" in line), str(exc))
        raise InputError(path, f"cannot read image header ({first_line.strip()[:200]})") from exc
    size = tuple(int(s) for s in reader.GetSize())
    if not 2 <= len(size) <= 4:
        raise InputError(path, f"{len(size)}-D image of size {size}; expected a 3-D volume (z, y, x)")
    components = int(reader.GetNumberOfComponents())
    try:  # bytes per component, from a 1-pixel image of the same pixel type
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).dtype.itemsize
    except RuntimeError as exc:
        raise InputError(path, f"unsupported pixel type ({reader.GetPixelIDTypeAsString()})") from exc
    check_declared_size(path, (*size, components), itemsize, max_voxels)
    data_bytes = os.path.getsize(source)
    if compressed:
        check_declared_size(path, (*size, components), itemsize, max_voxels, deflate_bytes=data_bytes)
    elif source != path or path.name.lower().endswith((".mha", ".nii")):
        check_declared_size(path, (*size, components), itemsize, max_voxels, stored_bytes=data_bytes)


def _read_sitk(path: Path, lazy: bool, max_voxels: int | None = None) -> Volume:
    import SimpleITK as sitk

    _check_sitk_size(path, max_voxels)
    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line message
        first_line = next((line for line in str(exc).splitlines() if "ERROR" in line or "error" in line), str(exc))
        raise InputError(path, f"cannot read image ({first_line.strip()[:200]})") from exc
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            path, f"multi-channel image ({image.GetNumberOfComponentsPerPixel()} components); expected one channel"
        )
    size = image.GetSize()[::-1]
    if image.GetDimension() == 4 and size[0] == 1:  # a 4-D file with a single time point
        image = image[:, :, :, 0]
        size = image.GetSize()[::-1]
    _check_array_shape(path, tuple(size))
    data = sitk.GetArrayFromImage(image)
    _check_dtype(path, data.dtype)
    if data.dtype.kind == "f" and path.name.lower().endswith((".nii", ".nii.gz")):
        nonfinite = _nifti_nonfinite(path, data.shape)
        if nonfinite is not None:
            data[nonfinite] = np.nan  # restore what ITK silently zeroed, so callers can refuse it
    meta = {"origin": image.GetOrigin(), "direction": image.GetDirection(), "sitk_spacing": image.GetSpacing()}
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    return Volume(data=data, spacing=spacing, path=path, fmt="sitk", meta=meta)  # type: ignore[arg-type]


def _write_sitk(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask)
    if spacing is not None:
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    if like is not None and like.fmt == "sitk" and like.shape == mask.shape:
        image.SetOrigin(like.meta["origin"])
        image.SetDirection(like.meta["direction"])
    sitk.WriteImage(image, str(path), useCompression=True)


# --------------------------------------------------------------------------------------------
# Zarr / OME-Zarr


def _ngff_multiscales(attrs: dict) -> tuple[list | None, str | None]:
    """NGFF multiscales and version: 0.4 keeps them at the top, 0.5 (zarr v3) under ``ome``."""
    if isinstance(attrs.get("ome"), dict) and attrs["ome"].get("multiscales"):
        return attrs["ome"]["multiscales"], str(attrs["ome"].get("version", "0.5"))
    multiscales = attrs.get("multiscales")
    if multiscales:
        return multiscales, str(multiscales[0].get("version", "0.4"))
    return None, None


def _read_zarr(path: Path, lazy: bool, max_voxels: int | None = None) -> Volume:
    try:
        import zarr
    except ImportError as exc:
        raise InputError(path, "reading zarr needs the 'zarr' package, a core dependency of lsmseg: pip install 'zarr>=3'") from exc
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(path, f"cannot open zarr ({type(exc).__name__}: {exc})") from exc
    spacing, meta = None, {"zarr_format": int(getattr(getattr(node, "metadata", None), "zarr_format", 3) or 3)}
    if isinstance(node, zarr.Group):
        multiscales, version = _ngff_multiscales(dict(node.attrs))
        key = multiscales[0]["datasets"][0]["path"] if multiscales else "0"
        if key not in node:
            raise InputError(path, "zarr group has no array '0' (not an OME-Zarr image)")
        array = node[key]
        if multiscales:
            spacing, ngff = _ngff_spatial(multiscales[0])
            meta["ngff"] = {**ngff, "version": version}
    else:
        array = node
    shape = tuple(array.shape)
    itemsize = np.dtype(array.dtype).itemsize
    check_declared_size(path, shape, itemsize, max_voxels, what="zarr array")
    # A chunk is decompressed whole: a chunk far larger than the array is an allocation bomb too.
    check_declared_size(path, tuple(array.chunks), itemsize, max_voxels, what="zarr chunk")
    kept_shape = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    _check_array_shape(path, kept_shape)
    _check_dtype(path, np.dtype(array.dtype))
    data = _GuardedArray(array, path, "zarr chunk")
    if len(shape) != 3:
        data = _GuardedArray(array, path, "zarr chunk")[(0,) * (len(shape) - 3)]
    elif not lazy:
        data = data[...]
    return Volume(data=data, spacing=spacing, path=path, fmt="zarr", meta=meta)  # type: ignore[arg-type]


def _ngff_spatial(multiscale: dict) -> tuple[Spacing | None, dict]:
    """Spacing in micrometres, and the last three axes' units, scale and translation as stored."""
    axes = multiscale.get("axes") or [{"name": a, "type": "space"} for a in "zyx"]
    axes = [a if isinstance(a, dict) else {"name": str(a), "type": "space"} for a in axes][-3:]
    scale, translation = None, None
    for transform in multiscale["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"][-3:]]
        elif transform.get("type") == "translation":
            translation = [float(v) for v in transform["translation"][-3:]]
    spacing = None
    if scale is not None and len(scale) == 3:
        values = [_to_um(v, a.get("unit", "micrometer")) for v, a in zip(scale, axes)]
        spacing = None if None in values else tuple(values)
    return spacing, {"axes": axes, "scale": scale, "translation": translation}  # type: ignore[return-value]


def _ngff_attrs(shape_axes: int, spacing: Spacing | None, like: "Volume | None", zarr_format: int) -> dict:
    """NGFF multiscales for a one-level mask: the input's units, scale and translation when it was
    OME-Zarr, else micrometres; version 0.4 in a zarr v2 store, 0.5 (under ``ome``) in zarr v3."""
    ngff = like.meta.get("ngff") if like is not None and like.fmt == "zarr" else None
    if ngff and ngff.get("scale") and (spacing is None or spacing == like.spacing):
        axes, scale, translation = ngff["axes"], list(ngff["scale"]), ngff.get("translation")
    else:
        axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
        scale, translation = (list(spacing) if spacing is not None else [1.0, 1.0, 1.0]), None
    transforms = [{"type": "scale", "scale": scale}]
    if translation:
        transforms.append({"type": "translation", "translation": list(translation)})
    multiscale = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}], "name": "mask"}
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def _mask_zarr_format(like: "Volume | None") -> int:
    """A mask is stored in the zarr version of its zarr input; otherwise zarr v3 (NGFF 0.5)."""
    return int(like.meta.get("zarr_format", 3)) if like is not None and like.fmt == "zarr" else 3


def _write_zarr(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    array = create_zarr_mask(path, mask.shape, mask.dtype, (64, 256, 256), spacing, like=like)
    array[...] = mask


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Path, bool, "int | None"], Volume]
    write: Callable[[np.ndarray, Path, "Volume | None", "Spacing | None"], None]


FORMATS = {
    "tiff": Format("tiff", _read_tiff, _write_tiff),
    "planes": Format("planes", _read_planes, _write_planes),
    "sitk": Format("sitk", _read_sitk, _write_sitk),
    "zarr": Format("zarr", _read_zarr, _write_zarr),
}


def detect_format(path: str | Path) -> str:
    """The registry key for ``path``, by suffix (files) or content (folders)."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(ZARR_SUFFIXES) or (path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))):
        return "zarr"
    if path.is_dir():
        return "planes"
    if lower.endswith(TIFF_SUFFIXES):
        return "tiff"
    if lower.endswith(SITK_SUFFIXES):
        return "sitk"
    supported = ", ".join(sorted({*TIFF_SUFFIXES, *SITK_SUFFIXES, *ZARR_SUFFIXES})) + ", or a folder of TIFF planes"
    raise InputError(path, f"not a supported volume format (supported: {supported})")


def read_volume(path: str | Path, lazy: bool = False, max_voxels: int | None = None) -> Volume:
    """Read one volume. Raises :class:`InputError` with a one-line reason for anything unusable.

    ``lazy=True`` returns an array-like that reads on demand where the format allows it (TIFF
    stacks through tifffile's zarr view, plane folders plane by plane, zarr natively).
    ``max_voxels`` caps the declared size, checked before any pixel is read (None:
    ``LSMSEG_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`); so is the declared size against what
    the file can hold.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if not (path.is_file() or path.is_dir()):
        raise InputError(path, "not a regular file or folder")
    fmt = detect_format(path)
    return FORMATS[fmt].read(path, lazy, max_voxels)


def write_mask(
    mask: np.ndarray, path: str | Path, like: Volume | None = None, spacing: Spacing | None = None
) -> Path:
    """Write a mask atomically, in the container format that ``path``'s name implies.

    Spacing (and, for SimpleITK formats, origin and direction) comes from ``like`` unless given.
    """
    path = Path(path)
    if spacing is None and like is not None:
        spacing = like.spacing
    fmt = mask_format_for(path, like)
    with atomic_output(path) as tmp:
        FORMATS[fmt].write(np.ascontiguousarray(mask), tmp, like, spacing)
    return path


# --------------------------------------------------------------------------------------------
# Block-wise mask writers: the mask arrives block by block and is never whole in memory (except for
# the SimpleITK formats, whose writers need the whole image; their readers hold it anyway).

def iter_slabs(blocks, shape: tuple[int, ...], dtype=np.uint8) -> Iterator[tuple[int, np.ndarray]]:
    """Assemble z-major blocks into complete z-slabs; yield ``(z_start, slab)``.

    Blocks must come in z-major order (all blocks of one z-range before the next), which is the
    order :func:`lsmseg.blocks.plan_blocks` produces; only one slab is held at a time.
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


def _planes_from_blocks(blocks, shape, dtype) -> Iterator[np.ndarray]:
    for _, slab in iter_slabs(blocks, shape, dtype):
        yield from slab


def _write_tiff_blocks(blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None) -> None:
    """A multi-page TIFF written plane by plane as z-slabs complete (tifffile pulls the planes)."""
    import tifffile

    ome = _is_ome_name(path)
    kwargs = _tiff_write_kwargs(spacing, dtype, like, ome=ome)
    imagej = kwargs.pop("imagej")
    kwargs.pop("ome", None)
    bigtiff = math.prod(shape) * np.dtype(dtype).itemsize > 2**32 - 2**25
    with tifffile.TiffWriter(path, imagej=imagej and not bigtiff, bigtiff=bigtiff, ome=ome) as tif:
        tif.write(_planes_from_blocks(blocks, shape, dtype), shape=tuple(shape), dtype=dtype, **kwargs)


def _write_planes_blocks(blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None) -> None:
    import tifffile

    names = (like.meta.get("plane_names") if like is not None else None) or [
        f"z{index:05d}.tif" for index in range(shape[0])
    ]
    if len(names) != shape[0]:
        raise OutputError(path, f"mask has {shape[0]} planes but the input had {len(names)}")
    path.mkdir(parents=True)
    kwargs = _tiff_write_kwargs(spacing, dtype, like)
    kwargs["metadata"] = {k: v for k, v in kwargs["metadata"].items() if k != "axes"} | {"axes": "YX"}
    for start, slab in iter_slabs(blocks, shape, dtype):
        for offset, plane in enumerate(slab):
            tifffile.imwrite(path / names[start + offset], plane, **kwargs)


def create_zarr_mask(path: Path, shape, dtype, chunks, spacing: Spacing | None, like: "Volume | None" = None):
    """An empty OME-Zarr (one level) whose array '0' blocks can be written into.

    NGFF metadata matches the zarr version written (0.4 for v2, 0.5 for v3) and keeps an OME-Zarr
    input's units and translation (``like``).
    """
    import zarr

    zarr_format = _mask_zarr_format(like)
    chunks = tuple(max(1, min(int(s), int(c))) for s, c in zip(shape, chunks))
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    array = root.create_array("0", shape=tuple(shape), dtype=dtype, chunks=chunks, fill_value=0)
    root.attrs.update(_ngff_attrs(len(shape), spacing, like, zarr_format))
    return array


ZARR_MASK_CHUNKS = (64, 256, 256)


def _write_zarr_blocks(
    blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None, chunks=ZARR_MASK_CHUNKS
) -> None:
    array = create_zarr_mask(path, shape, dtype, chunks, spacing, like=like)
    for index, block in blocks:
        array[index] = block


def _write_sitk_blocks(blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None) -> None:
    mask = np.zeros(tuple(shape), dtype=dtype)
    for index, block in blocks:
        mask[index] = block
    _write_sitk(mask, path, like, spacing)


BLOCK_WRITERS: dict[str, Callable] = {
    "tiff": _write_tiff_blocks,
    "planes": _write_planes_blocks,
    "zarr": _write_zarr_blocks,
    "sitk": _write_sitk_blocks,
}


def mask_format_for(path: str | Path, like: Volume | None = None) -> str:
    """The writer for an output path: by suffix; a name without a volume suffix is the input's
    container when that was zarr (a zarr folder needs no suffix), else a plane folder."""
    path = Path(path)
    if path.name.lower().endswith(KNOWN_SUFFIXES):
        return detect_format(path)
    return "zarr" if like is not None and like.fmt == "zarr" else "planes"


def write_mask_blocks(
    blocks, path: str | Path, shape, like: Volume | None = None, spacing: Spacing | None = None,
    dtype=np.uint8, **writer_options,
) -> Path:
    """Write a mask that arrives as ``(slices, block)`` pairs in z-major order, atomically.

    The writer pulls blocks as it goes (TIFF plane by plane, zarr region by region), so the mask is
    never whole in memory. Any error - in the writer or in whatever produces the blocks - removes
    the partial output; an ``OSError`` (disk full) becomes an :class:`OutputError` naming the file.
    """
    path = Path(path)
    if spacing is None and like is not None:
        spacing = like.spacing
    fmt = mask_format_for(path, like)
    with atomic_output(path) as tmp:
        BLOCK_WRITERS[fmt](blocks, tmp, tuple(int(s) for s in shape), np.dtype(dtype), like, spacing, **writer_options)
    return path


def write_volume(array: np.ndarray, path: str | Path, spacing: Spacing | None = None) -> Path:
    """Write any 3-D array (image or label) in the format ``path`` implies; used by phantoms/tests."""
    return write_mask(array, path, like=None, spacing=spacing)


def list_volumes(folder: str | Path) -> list[Path]:
    """Every candidate volume in ``folder``, naturally sorted (hidden and partial files skipped).

    Files of unknown type are listed too, so that the caller reports them as bad input instead of
    silently ignoring them; sidecar files (provenance JSON) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "input folder does not exist")
    entries = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith((".json", ".md", ".txt")):
            continue
        entries.append(entry)
    return natural_sorted(entries)


def is_plane_folder(folder: Path) -> bool:
    """A folder whose only volumes are 2-D TIFF planes is one volume; otherwise a folder of volumes."""
    import tifffile

    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries or any(p.is_dir() for p in entries):
        return False
    planes = [p for p in entries if p.suffix.lower() in PLANE_SUFFIXES]
    if not planes or len(planes) != len(entries):
        return False
    try:
        with tifffile.TiffFile(natural_sorted(planes)[0]) as tif:
            return len(tif.series[0].shape) == 2
    except Exception:
        return False


def expand_inputs(paths) -> list[Path]:
    """CLI inputs to volumes: files and volume folders (planes, zarr) as given, other folders listed."""
    volumes: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and detect_format(path) == "planes" and not is_plane_folder(path):
            volumes.extend(list_volumes(path))
        else:
            volumes.append(path)
    return volumes
