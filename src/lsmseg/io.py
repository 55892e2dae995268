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

Spacing = tuple[float, float, float]

TIFF_SUFFIXES = (".tif", ".tiff")
SITK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
# Longest first, so that "x.ome.tif" loses ".ome.tif" and not just ".tif".
KNOWN_SUFFIXES = tuple(
    sorted((".ome.tif", ".ome.tiff", *TIFF_SUFFIXES, *SITK_SUFFIXES, *ZARR_SUFFIXES), key=len, reverse=True)
)
PARTIAL_PREFIX = ".partial-"


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
    tmp = path.parent / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"
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

_UNIT_TO_UM = {"micron": 1.0, "um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "microns": 1.0, "nm": 1e-3, "mm": 1e3}


def _tiff_spacing(tif) -> Spacing | None:
    """Voxel spacing from ImageJ metadata (z) and resolution tags (x, y), in micrometres."""
    # ImageJ metadata, or tifffile's own JSON description for dtypes ImageJ cannot hold.
    ij = tif.imagej_metadata or (tif.shaped_metadata[0] if tif.shaped_metadata else None) or {}
    page = tif.pages[0]
    z = ij.get("spacing")
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        x = xres[1] / xres[0]
        y = yres[1] / yres[0]
    except (KeyError, ZeroDivisionError, TypeError):
        return None
    if z is None:
        return None
    scale = _UNIT_TO_UM.get(str(ij.get("unit", "um")).lower(), 1.0)
    return (float(z) * scale, float(y) * scale, float(x) * scale)


class _LazyTiff:
    """Read-only array view of a (possibly compressed) TIFF series, read on demand through zarr."""

    def __init__(self, path: Path, index: tuple):
        import tifffile
        import zarr

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
        return np.asarray(self._array[tuple(full)])

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


def _read_tiff(path: Path, lazy: bool) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(path, "cannot read TIFF: no readable image (corrupt or truncated file)")
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            spacing = _tiff_spacing(tif)
            dtype = np.dtype(series.dtype)
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InputError(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    kept_shape, kept_axes, index = _squeeze_axes(shape, axes)
    _check_array_shape(path, kept_shape, kept_axes)
    _check_dtype(path, dtype)
    meta = {"axes": kept_axes}
    try:
        if lazy:
            data = _LazyTiff(path, index)
        else:
            data = tifffile.imread(path, series=0)[index]
    except Exception as exc:
        raise InputError(path, f"cannot read TIFF pixel data ({type(exc).__name__}: {exc})") from exc
    return Volume(data=data, spacing=spacing, path=path, fmt="tiff", meta=meta)


IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def _tiff_write_kwargs(spacing: Spacing | None, dtype: np.dtype) -> dict:
    imagej = np.dtype(dtype) in [np.dtype(d) for d in IMAGEJ_DTYPES]
    kwargs: dict = {"compression": "zlib", "imagej": imagej, "metadata": {"axes": "ZYX"}}
    if spacing is not None:
        kwargs["resolution"] = (1.0 / spacing[2], 1.0 / spacing[1])
        kwargs["metadata"].update(spacing=spacing[0], unit="um")
    return kwargs


def _write_tiff(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    import tifffile

    tifffile.imwrite(path, mask, **_tiff_write_kwargs(spacing, mask.dtype))


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

    def __init__(self, folder: Path, planes: list[Path]):
        import tifffile

        self.folder, self.planes = folder, planes
        shapes, dtypes = {}, {}
        for plane in planes:
            try:
                with tifffile.TiffFile(plane) as tif:
                    page = tif.pages[0]
                    shapes[plane.name] = tuple(page.shape)
                    dtypes[plane.name] = np.dtype(page.dtype)
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

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        import tifffile

        if key is Ellipsis:
            key = (slice(None),)
        if not isinstance(key, tuple):
            key = (key,)
        z_key, rest = key[0], key[1:]
        if isinstance(z_key, (int, np.integer)):
            return tifffile.imread(self.planes[z_key])[rest] if rest else tifffile.imread(self.planes[z_key])
        indices = range(*z_key.indices(self.shape[0]))
        out = [tifffile.imread(self.planes[i])[rest] if rest else tifffile.imread(self.planes[i]) for i in indices]
        if not out:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.stack(out)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


def _read_planes(path: Path, lazy: bool) -> Volume:
    planes = _plane_files(path)
    if not planes:
        raise InputError(path, "folder contains no .tif/.tiff planes")
    _check_plane_sequence(path, planes)
    stack = PlaneStack(path, planes)
    _check_dtype(path, stack.dtype)
    spacing = None
    try:
        import tifffile

        with tifffile.TiffFile(planes[0]) as tif:
            spacing = _tiff_spacing(tif)
    except Exception:  # spacing is optional metadata; the planes themselves were checked above
        spacing = None
    meta = {"plane_names": [p.name for p in planes]}
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
    kwargs = _tiff_write_kwargs(spacing, mask.dtype)
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


def _read_sitk(path: Path, lazy: bool) -> Volume:
    import SimpleITK as sitk

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


def _read_zarr(path: Path, lazy: bool) -> Volume:
    try:
        import zarr
    except ImportError as exc:
        raise InputError(path, "reading zarr needs the 'zarr' package, a core dependency of lsmseg: pip install 'zarr>=3'") from exc
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(path, f"cannot open zarr ({type(exc).__name__}: {exc})") from exc
    spacing = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        key = multiscales[0]["datasets"][0]["path"] if multiscales else "0"
        if key not in node:
            raise InputError(path, "zarr group has no array '0' (not an OME-Zarr image)")
        array = node[key]
        if multiscales:
            for transform in multiscales[0]["datasets"][0].get("coordinateTransformations", []):
                if transform.get("type") == "scale":
                    spacing = tuple(float(s) for s in transform["scale"][-3:])
    else:
        array = node
    shape = tuple(array.shape)
    kept_shape = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    _check_array_shape(path, kept_shape)
    _check_dtype(path, np.dtype(array.dtype))
    data = array if len(shape) == 3 else array[(0,) * (len(shape) - 3)]
    if len(shape) == 3 and not lazy:
        data = np.asarray(array[...])
    return Volume(data=data, spacing=spacing, path=path, fmt="zarr", meta={})  # type: ignore[arg-type]


def _write_zarr(mask: np.ndarray, path: Path, like: Volume | None, spacing: Spacing | None) -> None:
    import zarr

    chunks = tuple(min(s, c) for s, c in zip(mask.shape, (64, 256, 256)))
    root = zarr.open_group(str(path), mode="w")
    array = root.create_array("0", shape=mask.shape, dtype=mask.dtype, chunks=chunks)
    array[...] = mask
    scale = list(spacing) if spacing is not None else [1.0, 1.0, 1.0]
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }
    ]


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Path, bool], Volume]
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


def read_volume(path: str | Path, lazy: bool = False) -> Volume:
    """Read one volume. Raises :class:`InputError` with a one-line reason for anything unusable.

    ``lazy=True`` returns an array-like that reads on demand where the format allows it (TIFF
    stacks through tifffile's zarr view, plane folders plane by plane, zarr natively).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    fmt = detect_format(path)
    return FORMATS[fmt].read(path, lazy)


def write_mask(
    mask: np.ndarray, path: str | Path, like: Volume | None = None, spacing: Spacing | None = None
) -> Path:
    """Write a mask atomically, in the container format that ``path``'s name implies.

    Spacing (and, for SimpleITK formats, origin and direction) comes from ``like`` unless given.
    """
    path = Path(path)
    if spacing is None and like is not None:
        spacing = like.spacing
    # A name without a volume suffix is a folder of planes (the output of a plane-folder input).
    fmt = detect_format(path) if path.name.lower().endswith(KNOWN_SUFFIXES) else "planes"
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

    kwargs = _tiff_write_kwargs(spacing, dtype)
    imagej = kwargs.pop("imagej")
    bigtiff = math.prod(shape) * np.dtype(dtype).itemsize > 2**32 - 2**25
    with tifffile.TiffWriter(path, imagej=imagej and not bigtiff, bigtiff=bigtiff) as tif:
        tif.write(_planes_from_blocks(blocks, shape, dtype), shape=tuple(shape), dtype=dtype, **kwargs)


def _write_planes_blocks(blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None) -> None:
    import tifffile

    names = (like.meta.get("plane_names") if like is not None else None) or [
        f"z{index:05d}.tif" for index in range(shape[0])
    ]
    if len(names) != shape[0]:
        raise OutputError(path, f"mask has {shape[0]} planes but the input had {len(names)}")
    path.mkdir(parents=True)
    kwargs = _tiff_write_kwargs(spacing, dtype)
    kwargs["metadata"] = {k: v for k, v in kwargs["metadata"].items() if k != "axes"} | {"axes": "YX"}
    for start, slab in iter_slabs(blocks, shape, dtype):
        for offset, plane in enumerate(slab):
            tifffile.imwrite(path / names[start + offset], plane, **kwargs)


def create_zarr_mask(path: Path, shape, dtype, chunks, spacing: Spacing | None):
    """An empty OME-Zarr (v0.4 multiscales, one level) whose array '0' blocks can be written into."""
    import zarr

    chunks = tuple(max(1, min(int(s), int(c))) for s, c in zip(shape, chunks))
    root = zarr.open_group(str(path), mode="w")
    array = root.create_array("0", shape=tuple(shape), dtype=dtype, chunks=chunks, fill_value=0)
    scale = list(spacing) if spacing is not None else [1.0, 1.0, 1.0]
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }
    ]
    return array


ZARR_MASK_CHUNKS = (64, 256, 256)


def _write_zarr_blocks(
    blocks, path: Path, shape, dtype, like: Volume | None, spacing: Spacing | None, chunks=ZARR_MASK_CHUNKS
) -> None:
    array = create_zarr_mask(path, shape, dtype, chunks, spacing)
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


def mask_format_for(path: str | Path) -> str:
    """The writer for an output path: by suffix; a name without a volume suffix is a plane folder."""
    path = Path(path)
    return detect_format(path) if path.name.lower().endswith(KNOWN_SUFFIXES) else "planes"


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
    fmt = mask_format_for(path)
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
