"""Multi-page TIFF stacks (ImageJ hyperstacks, OME-TIFF, plain multi-page), through tifffile.

Spacing comes from OME-XML, else from ImageJ metadata and the resolution tags; a mask keeps it
(OME-XML for ``.ome.tif``, ImageJ metadata otherwise; tifffile's own metadata for a stack of one
plane, which neither tells from a 2-D image, and for planes one voxel wide, which ImageJ's writer
cannot store). Lazy reads go through tifffile's own zarr view of the file. Before tifffile parses
anything, the IFD chain is counted and the declared size is checked against the voxel cap and
against what the file can hold.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError
from .paths import OME_TIFF_SUFFIXES
from .volume import (
    LazyArray, Spacing, Volume, VolumeFormat, check_array_shape, check_declared_size, check_dtype, iter_slabs, to_um,
)

logger = logging.getLogger(__name__)


def _tifffile_to_debug(record: logging.LogRecord) -> bool:
    """tifffile logs what it finds wrong in a file at ERROR level (``invalid page offset``) and
    then raises or recovers; the reader reports the file in one ``ERROR: <file>: <reason>`` line,
    so tifffile's own lines are kept for debugging (``--verbose``) only."""
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logger.isEnabledFor(logging.DEBUG)


logging.getLogger("tifffile").addFilter(_tifffile_to_debug)

MAX_TIFF_PAGES = 100_000  # more IFDs than any real z-stack; counted without parsing them
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)
# Pixel types OME-XML can name; others (float16 probability maps, 64-bit integers) are written
# with tifffile's own metadata (spacing kept) even under an .ome.tif name.
OME_DTYPES = (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64)
_TIFF_DEFLATE = (8, 32946)  # ADOBE_DEFLATE, DEFLATE


def count_tiff_pages(path: Path, limit: int) -> int:
    """Number of IFDs (pages) in a TIFF, walking only the IFD chain; stops counting at ``limit + 1``.

    tifffile parses every page of a generic multi-page file into objects (minutes and GBs for a
    forged file of 300 000 tiny pages); following the offsets alone costs a few bytes per page.
    """
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


# --------------------------------------------------------------------------------------------
# Metadata


def _ome_spacing(tif) -> Spacing | None:
    """Voxel spacing from OME-XML ``Pixels`` PhysicalSize{Z,Y,X} (with their units), in micrometres."""
    import tifffile

    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except Exception:  # malformed OME-XML: spacing is optional
        return None
    values = [to_um(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm")) for a in "ZYX"]
    return None if None in values else tuple(values)  # type: ignore[return-value]


def tiff_metadata(tif) -> tuple[Spacing | None, dict]:
    """Voxel spacing in micrometres (OME-XML, else ImageJ z spacing and resolution tags), and what
    a mask needs to keep when the z spacing is unknown (the XY resolution and its unit).

    Args:
        tif: an open ``tifffile.TiffFile``.
    """
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
    values = [to_um(v, unit) for v in (z, y, x)]
    return (None, {}) if None in values else (tuple(values), {})  # type: ignore[return-value]


def tiff_write_kwargs(spacing: Spacing | None, dtype: np.dtype, like: Volume | None = None, ome: bool = False) -> dict:
    """tifffile arguments that keep the spacing: OME-XML for ``.ome.tif``, else ImageJ metadata.

    When the input's z spacing was unknown, its XY resolution (and unit) is still written back.

    Args:
        spacing: (z, y, x) in micrometres, or None.
        dtype: the data's dtype (ImageJ holds only uint8, uint16 and float32).
        like: the input volume, whose XY resolution is kept when its spacing was unknown.
        ome: write OME-XML.
    """
    if ome:
        metadata: dict = {"axes": "ZYX"}
        if spacing is not None:
            for axis, value in zip("ZYX", spacing):
                metadata[f"PhysicalSize{axis}"] = float(value)
                metadata[f"PhysicalSize{axis}Unit"] = "µm"
        return {"compression": "zlib", "photometric": "minisblack", "imagej": False, "ome": True, "metadata": metadata}
    imagej = np.dtype(dtype) in [np.dtype(d) for d in IMAGEJ_DTYPES]
    # minisblack: never taken for RGB, even when the last axis is 3 or 4 voxels long.
    kwargs: dict = {"compression": "zlib", "photometric": "minisblack", "imagej": imagej, "metadata": {"axes": "ZYX"}}
    if spacing is not None:
        kwargs["resolution"] = (1.0 / spacing[2], 1.0 / spacing[1])
        kwargs["metadata"].update(spacing=spacing[0], unit="um")
    elif like is not None and like.meta.get("xy_resolution"):
        y, x = like.meta["xy_resolution"]
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["metadata"].update(unit=like.meta.get("unit", "um"))
    return kwargs


def squeeze_axes(shape: tuple, axes: str) -> tuple[tuple, str, tuple]:
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


def _check_tiff_size(path: Path, tif, shape: tuple, dtype: np.dtype, max_voxels: int | None) -> None:
    """The declared series shape against the cap, and against the bytes the strips hold."""
    page = tif.pages.first
    # Bytes per voxel as stored: a bilevel TIFF (bool) packs 8 voxels a byte (rows padded to bytes).
    bits = int(getattr(page, "bitspersample", 8) or 8)
    itemsize = bits / 8 if bits < 8 else dtype.itemsize
    check_declared_size(path, shape, itemsize, max_voxels, what="TIFF")
    compression = int(getattr(page, "compression", 1))
    pages = len(tif.pages)
    # Each page's strips/tiles are counted once: forged files point many pages at the same data.
    spans = set()
    for p in (tif.pages[i] for i in range(min(pages, 4))):
        spans.update(zip(p.dataoffsets, p.databytecounts))
    per_page = sum(b for _, b in spans) / max(min(pages, 4), 1)
    stored = int(min(per_page * pages, os.path.getsize(path)))
    if compression == 1:
        check_declared_size(path, shape, itemsize, max_voxels, stored_bytes=os.path.getsize(path), what="TIFF")
    elif compression in _TIFF_DEFLATE:
        check_declared_size(path, shape, itemsize, max_voxels, deflate_bytes=stored, what="TIFF")


def _planes_appended_one_by_one(tif) -> bool:
    """Whether every image of the file is one 2-D page of one shape and type, as tifffile writes a
    stack appended plane by plane (``imwrite(..., append=True)``): then the pages are the stack."""
    series = tif.series
    return len(series) > 1 and all(
        s.kind == "shaped" and len(s.pages) == 1 and s.shape == series[0].shape and len(s.shape) == 2
        and s.dtype == series[0].dtype for s in series)


def _refuse_several_images(path: Path, tif) -> None:
    """Refuse a file that holds more than one image (series): pages that differ in shape or type
    (tifffile groups the equal ones and would silently drop the others, shifting the planes), or
    several OME images. Reduced-resolution pages (thumbnails, pyramid levels) do not count, nor
    single smaller 2-D pages after the whole stack (thumbnails not marked as such)."""
    images = [s for s in tif.series if not all(getattr(p, "is_reduced", False) for p in s.pages if p is not None)]
    if len(images) < 2:
        return
    main = images[0]
    last = max((p.index for p in main.pages if p is not None), default=-1)
    plane = main.shape[-2:]

    def thumbnail(s) -> bool:
        pages = [p for p in s.pages if p is not None]
        return (len(pages) == 1 and len(s.shape) == 2 and pages[0].index > last
                and all(t < m for t, m in zip(s.shape, plane)))

    images = [main] + [s for s in images[1:] if not thumbnail(s)]
    if len(images) < 2:
        return
    shown = ", ".join(f"{' x '.join(map(str, s.shape))} {s.dtype}" for s in images[:3]) + (" ..." if len(images) > 3 else "")
    if all(s.kind in ("generic", "shaped", "uniform") and len(s.shape) <= 3 for s in images):
        reason = f"pages differ in shape or type ({len(images)} groups: {shown}); expected a stack of equal planes"
    else:
        reason = (f"holds {len(images)} images ({shown}); expected one 3-D volume per file: "
                  "save each image as a file of its own")
    raise InputError(path, reason)


class TiffFormat(VolumeFormat):
    """A 3-D stack in one TIFF file (``.tif``, ``.tiff``, ``.ome.tif``)."""

    name = "tiff"

    def read(self, path: Path, *, lazy: bool = False, max_voxels: int | None = None) -> Volume:
        import tifffile

        try:
            pages = count_tiff_pages(path, MAX_TIFF_PAGES)
            if pages > MAX_TIFF_PAGES:
                raise InputError(path, f"TIFF has more than {MAX_TIFF_PAGES:,} pages; refusing to parse it")
            if pages == 0:
                raise InputError(path, "cannot read TIFF: no readable image (corrupt or truncated file)")
            flags: dict = {}
            with tifffile.TiffFile(path) as tif:
                if _planes_appended_one_by_one(tif):
                    flags = {"is_shaped": False}  # read as one stack of its equal pages
            with tifffile.TiffFile(path, **flags) as tif:
                first = tif.pages.first
                itemsize = np.dtype(first.dtype or np.uint8).itemsize
                # One page's size first: a forged page of 10^10 pixels must not reach the allocator.
                check_declared_size(path, first.shaped, itemsize, max_voxels, what="TIFF page")
                check_declared_size(path, (pages, *first.shape), itemsize, max_voxels, what="TIFF")
                if not tif.series:
                    raise InputError(path, "cannot read TIFF: no readable image (corrupt or truncated file)")
                _refuse_several_images(path, tif)
                series = tif.series[0]
                shape, axes = tuple(series.shape), series.axes
                spacing, extra = tiff_metadata(tif)
                dtype = np.dtype(series.dtype)
                _check_tiff_size(path, tif, shape, dtype, max_voxels)
        except InputError:
            raise
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise InputError(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
        kept_shape, kept_axes, index = squeeze_axes(shape, axes)
        check_array_shape(path, kept_shape, kept_axes)
        check_dtype(path, dtype)
        meta = {"axes": kept_axes, **extra}
        try:
            if lazy:
                import zarr

                # tifffile's zarr view of the series: strips and tiles are read when a slice needs them.
                store = tifffile.imread(path, aszarr=True, series=0, **flags)
                data = LazyArray(zarr.open(store, mode="r"), path, "TIFF pixel data", index)
            else:
                data = tifffile.imread(path, series=0, **flags)[index]
        except Exception as exc:
            raise InputError(path, f"cannot read TIFF pixel data ({type(exc).__name__}: {exc})") from exc
        return Volume(data=data, spacing=spacing, path=path, fmt=self.name, meta=meta)

    def write_blocks(self, blocks, path: Path, *, shape, dtype, like=None, spacing=None) -> None:
        """A multi-page TIFF written plane by plane as z-slabs complete (tifffile pulls the planes)."""
        import tifffile

        shape = tuple(int(s) for s in shape)
        # One plane: OME-XML and ImageJ metadata cannot tell it from a 2-D image, which the reader
        # refuses; tifffile's own metadata keeps the shape (1, y, x). tifffile's ImageJ writer
        # fails on planes one voxel wide.
        ome = (path.name.lower().endswith(OME_TIFF_SUFFIXES) and np.dtype(dtype) in [np.dtype(d) for d in OME_DTYPES]
               and shape[0] > 1)
        kwargs = tiff_write_kwargs(spacing, dtype, like, ome=ome)
        imagej = kwargs.pop("imagej") and shape[0] > 1 and shape[2] > 1
        kwargs.pop("ome", None)
        bigtiff = math.prod(shape) * np.dtype(dtype).itemsize > 2**32 - 2**25
        planes = (plane for _, slab in iter_slabs(blocks, shape, dtype) for plane in slab)
        if shape[2] == 1 and not ome:
            # tifffile's writer drops a trailing length-1 axis and stores the z x y voxels as one
            # page (its metadata keeps the shape), so it takes them whole: the size of one plane.
            whole = np.empty(shape, dtype)  # once: np.stack of a list would hold it twice
            for z, plane in enumerate(planes):
                whole[z] = plane
            planes = whole
        with tifffile.TiffWriter(path, imagej=imagej and not bigtiff, bigtiff=bigtiff, ome=ome) as tif:
            tif.write(planes, shape=shape, dtype=dtype, **kwargs)
