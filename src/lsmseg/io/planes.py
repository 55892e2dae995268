"""Folders of 2-D TIFF planes, one file per z-plane, in natural order (``z2`` before ``z10``).

Every plane's header is checked first (one page, same shape, same type) and a numbered sequence
with a gap is refused, naming the missing numbers. Lazy reads go through tifffile's zarr view of the
file sequence (a plane is read when a slice touches it). A mask is written as a folder of planes
with the input's plane names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from .paths import TIFF_SUFFIXES, natural_sorted
from .tiff import count_tiff_pages, tiff_metadata, tiff_write_kwargs
from .volume import LazyArray, Volume, VolumeFormat, check_declared_size, check_dtype, iter_slabs

PLANE_SUFFIXES = TIFF_SUFFIXES


def plane_files(folder: Path) -> list[Path]:
    """The folder's TIFF files (hidden ones skipped), naturally sorted."""
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


def _plane_header(folder: Path, plane: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and type of one plane, from its header; a multi-page file is refused."""
    import tifffile

    try:
        if count_tiff_pages(plane, 1) > 1:
            raise InputError(
                folder, f"holds multi-page TIFF stacks ({plane.name} has more than one page), not 2-D planes; "
                "pass each stack as a volume of its own",
            )
        with tifffile.TiffFile(plane) as tif:
            page = tif.pages[0]
            return tuple(page.shape), np.dtype(page.dtype)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(plane, f"cannot read TIFF plane ({type(exc).__name__}: {exc})") from exc


def _read_plane(path, **kwargs) -> np.ndarray:
    """tifffile's imread, with a corrupt plane reported as one line naming the plane."""
    import tifffile

    try:
        return tifffile.imread(path, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read TIFF plane ({type(exc).__name__}: {exc})") from exc


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


class PlanesFormat(VolumeFormat):
    """A folder of 2-D TIFF planes."""

    name = "planes"
    writes_folder = True

    def read(self, path: Path, *, lazy: bool = False, max_voxels: int | None = None) -> Volume:
        import tifffile
        import zarr

        planes = plane_files(path)
        if not planes:
            raise InputError(path, "folder contains no .tif/.tiff planes")
        _check_plane_sequence(path, planes)
        headers = {plane.name: _plane_header(path, plane) for plane in planes}
        first = planes[0].name
        shape, dtype = headers[first]
        for name, (other_shape, other_dtype) in headers.items():
            if other_shape != shape:
                raise InputError(path, f"planes differ in shape: {first} is {shape}, {name} is {other_shape}")
            if other_dtype != dtype:
                raise InputError(path, f"planes differ in type: {first} is {dtype}, {name} is {other_dtype}")
        if len(shape) != 2:
            raise InputError(planes[0], f"plane of shape {shape} is not a single-channel 2-D image")
        check_declared_size(path, (len(planes), *shape), dtype.itemsize, max_voxels, what="plane folder")
        check_dtype(path, dtype)
        try:
            with tifffile.TiffFile(planes[0]) as tif:
                spacing, extra = tiff_metadata(tif)
        except Exception:  # spacing is optional metadata; the planes themselves were checked above
            spacing, extra = None, {}
        # tifffile's zarr view of the file sequence, in our order (sort=False): one chunk per plane.
        store = tifffile.TiffSequence(planes, sort=False, imread=_read_plane).aszarr()
        data = LazyArray(zarr.open(store, mode="r"), path, "TIFF plane")
        meta = {"plane_names": [p.name for p in planes], **extra}
        return Volume(data=data if lazy else data[...], spacing=spacing, path=path, fmt=self.name, meta=meta)

    def write_blocks(self, blocks, path: Path, *, shape, dtype, like=None, spacing=None) -> None:
        """One TIFF per plane, with the input's plane names, written as z-slabs complete."""
        import tifffile

        names = (like.meta.get("plane_names") if like is not None else None) or [
            f"z{index:05d}.tif" for index in range(shape[0])
        ]
        if len(names) != shape[0]:
            raise OutputError(path, f"mask has {shape[0]} planes but the input had {len(names)}")
        path.mkdir(parents=True)
        kwargs = tiff_write_kwargs(spacing, dtype, like)
        kwargs["metadata"] = {k: v for k, v in kwargs["metadata"].items() if k != "axes"} | {"axes": "YX"}
        for start, slab in iter_slabs(blocks, shape, dtype):
            for offset, plane in enumerate(slab):
                tifffile.imwrite(path / names[start + offset], plane, **kwargs)
