"""The one registry of formats: which class reads a path, and which writes a mask to a path.

Every writer goes through :func:`lsmseg.io.atomic.atomic_output`: a mask appears complete or not
at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_output, remove_path
from .paths import KNOWN_SUFFIXES, SITK_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, natural_sorted, outside_folder
from .planes import PlanesFormat, is_plane_folder
from .sitk import SitkFormat, detached_data_name
from .tiff import TiffFormat
from .volume import Spacing, Volume, VolumeFormat
from .zarr import ZarrFormat

FORMATS: dict[str, VolumeFormat] = {fmt.name: fmt for fmt in (TiffFormat(), PlanesFormat(), SitkFormat(), ZarrFormat())}


def _format_by_suffix(path: Path) -> str | None:
    """The registry key that ``path``'s name implies, or None for a name without a volume suffix."""
    lower = path.name.lower()
    if lower.endswith(ZARR_SUFFIXES):
        return ZarrFormat.name
    if lower.endswith(TIFF_SUFFIXES):
        return TiffFormat.name
    if lower.endswith(SITK_SUFFIXES):
        return SitkFormat.name
    return None


def detect_format(path: str | Path) -> str:
    """The registry key for reading ``path``, by suffix (files) or content (folders)."""
    path = Path(path)
    by_suffix = _format_by_suffix(path)
    if by_suffix == ZarrFormat.name or (path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))):
        return ZarrFormat.name
    if path.is_dir():
        return PlanesFormat.name
    if by_suffix is not None:
        return by_suffix
    supported = ", ".join(sorted({*TIFF_SUFFIXES, *SITK_SUFFIXES, *ZARR_SUFFIXES})) + ", or a folder of TIFF planes"
    raise InputError(path, f"not a supported volume format (supported: {supported})")


def mask_format_for(path: str | Path, like: Volume | None = None) -> str:
    """The writer for an output path: by its suffix alone, never by what is already there (a folder
    named ``x.tif`` does not turn a TIFF mask into planes); a name without a volume suffix is the
    input's container when that was zarr (a zarr folder needs no suffix), else a plane folder."""
    by_suffix = _format_by_suffix(Path(path))
    if by_suffix is not None:
        return by_suffix
    return ZarrFormat.name if like is not None and like.fmt == ZarrFormat.name else PlanesFormat.name


def read_volume(path: str | Path, lazy: bool = False, max_voxels: int | None = None) -> Volume:
    """Read one volume. Raises :class:`InputError` with a one-line reason for anything unusable.

    Args:
        path: a file, a folder of 2-D TIFF planes, or a zarr store.
        lazy: return an array-like that reads on demand where the format allows it (TIFF stacks and
            plane folders through tifffile's zarr views, zarr natively); SimpleITK formats are
            read whole.
        max_voxels: cap on the declared size, checked before any pixel is read (None:
            ``LSMSEG_MAX_VOXELS`` or :data:`lsmseg.io.volume.DEFAULT_MAX_VOXELS`); so is the
            declared size against what the file can hold.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if not (path.is_file() or path.is_dir()):
        raise InputError(path, "not a regular file or folder")
    return FORMATS[detect_format(path)].read(path, lazy=lazy, max_voxels=max_voxels)


def _write_atomically(path: str | Path, like: Volume | None, spacing: Spacing | None, write) -> Path:
    """``write(format, temporary path, spacing)`` for the format ``path`` implies, renamed into place
    when complete; the spacing is ``like``'s unless given."""
    path = Path(path)
    if spacing is None and like is not None:
        spacing = like.spacing
    fmt = FORMATS[mask_format_for(path, like)]
    with atomic_output(path, folder=fmt.writes_folder) as tmp:
        write(fmt, tmp, spacing)
    return path


def write_mask_blocks(
    blocks, path: str | Path, shape, like: Volume | None = None, spacing: Spacing | None = None,
    dtype=np.uint8, **writer_options,
) -> Path:
    """Write a mask that arrives as ``(slices, block)`` pairs in z-major order, atomically.

    The writer pulls blocks as it goes (TIFF plane by plane, zarr region by region), so the mask is
    never whole in memory (except in the SimpleITK formats, and a TIFF one voxel wide, whose z x y
    voxels tifffile takes at once). Any error - in the writer or in
    whatever produces the blocks - removes the partial output; an ``OSError`` (disk full) becomes
    an :class:`OutputError` naming the file.

    Args:
        blocks: iterable of ``(slices, block)``, all blocks of one z-range before the next.
        path: the output; its suffix picks the format (see :func:`mask_format_for`).
        shape: the whole mask's shape.
        like: the input volume: its spacing (unless ``spacing`` is given) and container metadata
            (plane names, origin and direction, NGFF units) are kept.
        spacing: (z, y, x) in micrometres.
        dtype: the mask's dtype.
        writer_options: passed to the format's ``write_blocks`` (e.g. ``chunks`` for zarr).
    """
    shape = tuple(int(s) for s in shape)
    return _write_atomically(path, like, spacing, lambda fmt, tmp, spacing_: fmt.write_blocks(
        blocks, tmp, shape=shape, dtype=np.dtype(dtype), like=like, spacing=spacing_, **writer_options))


def write_mask(mask: np.ndarray, path: str | Path, like: Volume | None = None, spacing: Spacing | None = None) -> Path:
    """Write a whole mask atomically, in the container format that ``path``'s name implies.

    Args as in :func:`write_mask_blocks`; spacing (and, for SimpleITK formats, origin and
    direction) comes from ``like`` unless given.
    """
    mask = np.ascontiguousarray(mask)
    return _write_atomically(path, like, spacing,
                             lambda fmt, tmp, spacing_: fmt.write(mask, tmp, like=like, spacing=spacing_))


def remove_output(path: str | Path) -> None:
    """Remove an output this run wrote: the file or folder, and a detached header's data file
    (``m.zraw`` of ``m.mhd``, as the header names it in its own folder)."""
    path = Path(path)
    data = detached_data_name(path) if path.is_file() else None
    remove_path(path)
    if data is not None:
        remove_path(path.parent / data)


def write_volume(array: np.ndarray, path: str | Path, spacing: Spacing | None = None) -> Path:
    """Write any 3-D array (image or label) in the format ``path`` implies; used by phantoms and tests."""
    return write_mask(array, path, like=None, spacing=spacing)


def list_volumes(folder: str | Path) -> list[Path]:
    """Every candidate volume in ``folder``, naturally sorted (hidden and partial files skipped).

    Files of unknown type are listed too, so that the caller reports them as bad input instead of
    silently ignoring them; sidecar files (provenance JSON, preview pictures, notes) are skipped, and so are the data
    files of ``.mhd``/``.nhdr`` headers in ``folder`` (``m.zraw`` of ``m.mhd``, named by the
    header's text; a name with a volume suffix stays listed). Links that lead out of ``folder``
    are listed as well, for the caller to refuse as bad input (:func:`outside_folder`); the headers
    read here are only those inside it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "input folder does not exist")
    entries = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith((".json", ".md", ".txt", ".preview.png")):
            continue
        entries.append(entry)
    data_files = {
        name for entry in entries
        if entry.name.lower().endswith((".mhd", ".nhdr", ".nrrd")) and entry.is_file() and outside_folder(entry, folder) is None
        and (name := detached_data_name(entry)) is not None
    }
    entries = [entry for entry in entries if entry.name not in data_files or entry.name.lower().endswith(KNOWN_SUFFIXES)]
    return natural_sorted(entries)


def expand_inputs(paths) -> list[Path]:
    """Command-line inputs to volumes: files and volume folders (planes, zarr) as given, other folders listed."""
    volumes: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and detect_format(path) == PlanesFormat.name and not is_plane_folder(path):
            volumes.extend(list_volumes(path))
        else:
            volumes.append(path)
    return volumes
