"""NIfTI, MetaImage (MHA/MHD) and NRRD, through SimpleITK.

A mask keeps the input's spacing, origin and direction. Before ITK sees a file, its header text is
read here: a detached data file must lie in the header's own folder, and the declared size is
checked against the voxel cap and against the bytes the data file holds. ITK's NIfTI reader
replaces NaN with 0; the raw voxels are read back so that a damaged volume is refused, not guessed.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from .atomic import companion_output, partial_path, partial_target, remove_path
from .volume import Volume, VolumeFormat, check_array_shape, check_declared_size, check_dtype

_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
# Bytes per voxel as stored, by NIfTI datatype code. ITK reports the pixel type it returns, which
# differs when the header's scl_slope/scl_inter rescale the voxels (uint8 on disk, float32 read).
_NIFTI_STORED_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                       1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _nifti_layout(header: bytes) -> tuple[str, int, int] | None:
    """Byte order, datatype code and offset of the voxels of a NIfTI-1/-2 header (None: neither)."""
    if len(header) < 348:
        return None
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:  # NIfTI-1
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = struct.unpack(endian + "f", header[108:112])[0]
            return endian, datatype, int(offset) if math.isfinite(offset) else -1
        if size == 540 and len(header) >= 540:  # NIfTI-2
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            return endian, datatype, struct.unpack(endian + "q", header[168:176])[0]
    return None


def _nifti_header(path: Path) -> bytes:
    """The first 540 bytes of a NIfTI file, decompressed for ``.nii.gz`` (b"" when unreadable)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.read(540)
    except (OSError, EOFError, zlib.error):
        return b""


def _check_gzip_complete(path: Path, expected: int) -> None:
    """Refuse a ``.nii.gz`` whose gzip stream ends early: ITK's reader fills the missing voxels
    with zeros and reports no error. The gzip trailer's size (mod 2^32) decides in one read; only
    when it disagrees is the stream inflated (block by block) to see whether it is complete."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        if struct.unpack("<I", fh.read(4))[0] == expected % 2**32:
            return
        fh.seek(0)
        _check_inflates(path, fh, expected, wbits=31, what="gzip")


def _check_inflates(path: Path, fh, expected: int, wbits: int, what: str) -> None:
    """Inflate the deflate streams (one after another, as gzip members or MetaIO's chunks) from
    ``fh``'s position, block by block, discarding the output, and refuse a corrupt or short one.

    Args:
        path: the file, named in the error.
        fh: the open file, at the first compressed byte.
        expected: the bytes the header declares.
        wbits: zlib's window bits: 31 for gzip, 15 for a zlib stream (MetaImage ``CompressedData``).
        what: the format, for the message.
    """
    inflater, total = zlib.decompressobj(wbits), 0
    try:
        while chunk := fh.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 24))
                chunk = inflater.unconsumed_tail
                if inflater.eof and inflater.unused_data.lstrip(b"\0"):  # another member or chunk
                    chunk, inflater = inflater.unused_data + chunk, zlib.decompressobj(wbits)
                elif inflater.eof:
                    break
    except zlib.error as exc:
        raise InputError(path, f"corrupt {what} data ({exc})") from exc
    if not inflater.eof:
        raise InputError(path, f"{what} data ends early (truncated or corrupt file)")
    if total < expected:
        raise InputError(path, f"{what} data holds {total:,} of the {expected:,} bytes the header declares (truncated file)")


def _nifti_nonfinite(path: Path, shape: tuple) -> np.ndarray | None:
    """Where a float NIfTI file holds NaN/Inf, read from its raw data (None: none, or not float).

    ITK's NIfTI reader replaces NaN with 0, which would let a damaged volume pass as a valid one;
    reading the raw voxels lets the caller see what the file really holds.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        layout = _nifti_layout(handle.read(540))
        if layout is None:
            return None
        endian, datatype, offset = layout
        if datatype not in _NIFTI_FLOAT_TYPES:
            return None
        handle.seek(offset)
        raw = np.frombuffer(handle.read(), dtype=endian + _NIFTI_FLOAT_TYPES[datatype], count=int(np.prod(shape)))
    nonfinite = ~np.isfinite(raw)
    return nonfinite.reshape(shape) if nonfinite.any() else None


_HEADER_LIMIT = 1 << 16  # header text read before handing a file to ITK

# ITK's ImageIO for each suffix: ITK picks one by the suffix's exact case (``x.MHA`` was "Unable to
# determine ImageIO reader"), so it is named here from the lower-cased suffix, for reading and writing.
_IMAGE_IO = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO",
             ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}


def _suffix(path: Path) -> str:
    """The lower-cased SimpleITK suffix of ``path`` ("" for none)."""
    lower = path.name.lower()
    return next((s for s in _IMAGE_IO if lower.endswith(s)), "")


def _image_io(path: Path) -> str:
    """The ITK ImageIO for ``path`` by its lower-cased suffix ("": let ITK choose)."""
    return _IMAGE_IO.get(_suffix(path), "")


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


def _local_pixel_offset(path: Path) -> int:
    """Where the pixels of a file holding its own start: after a MetaImage header's ElementDataFile
    line, or at a NIfTI header's vox_offset (0 when neither can be read; ITK then reports it)."""
    if path.name.lower().endswith((".mha", ".mhd")):
        offset = 0
        # latin-1: one character per byte, so lengths are byte offsets.
        for line in _header_text(path).splitlines(keepends=True):
            offset += len(line)
            if line.partition("=")[0].strip().lower() == "elementdatafile":
                return offset
        return 0
    with open(path, "rb") as handle:
        layout = _nifti_layout(handle.read(540))
    return max(layout[2], 0) if layout else 0


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


def _names_several_files(name: str) -> bool:
    """Whether a header's data-file value is a list (``LIST``) or a pattern (a ``%`` format), as
    MetaIO and teem read it; any other value is one file name, spaces included."""
    return name.upper().startswith("LIST") or "%" in name


def _confined_data_file(path: Path, name: str) -> Path:
    """A detached data file named by a header: one plain name that resolves inside the header's folder.

    MetaIO and teem take a value as a list (``LIST``) or a pattern (a ``%`` format, then numbers)
    only so; any other value is one file name, spaces included (``my case.zraw``)."""
    if not name or _names_several_files(name):
        raise InputError(path, f"data file '{name[:80]}' is a list or pattern of files; only one data file is supported")
    folder = os.path.realpath(path.parent)
    target = os.path.realpath(os.path.join(folder, name))
    if os.path.isabs(name) or not target.startswith(folder + os.sep):
        raise InputError(path, f"data file '{name[:80]}' lies outside the header's folder; refusing to read it")
    if not os.path.isfile(target):
        raise InputError(path, f"data file '{name[:80]}' is missing or not a regular file")
    return Path(target)


def _header_fields(path: Path) -> tuple[str | None, dict[str, str]]:
    """A MetaImage (``.mha``/``.mhd``) or NRRD (``.nrrd``/``.nhdr``) header's data-file value (None
    when it names none) and all its fields, lower-cased keys."""
    if path.name.lower().endswith((".mha", ".mhd")):
        fields = _metaimage_fields(path)
        return fields.get("elementdatafile"), fields
    fields = _nrrd_fields(path)
    return fields.get("data file", fields.get("datafile")), fields


def detached_data_name(path: Path) -> str | None:
    """The name of the data file that the ``.mhd``/``.nhdr``/``.nrrd`` header ``path`` names in its
    own folder, from the header's text only (its first 64 KiB); None for any other file, a header
    holding its own pixels, a list or pattern of files, a name in another folder, or an unreadable
    header (reading it reports that)."""
    if not path.name.lower().endswith((".mhd", ".nrrd", ".nhdr")):
        return None
    try:
        name, _ = _header_fields(path)
    except (OSError, InputError):
        return None
    if not name or name.upper() == "LOCAL" or _names_several_files(name):
        return None
    name = os.path.normpath(name)
    return None if "/" in name or os.sep in name or name in (".", "..") else name


def _sitk_data_source(path: Path) -> tuple[Path, bool]:
    """Where the pixels of an ITK file are and whether they are deflate-compressed, checked for
    confinement from the header text itself before ITK sees the file.

    ``.mha`` must hold its pixels (``ElementDataFile = LOCAL``); ``.mhd``/``.nhdr`` (and a
    detached ``.nrrd``) may name one data file, inside the header's own folder.
    """
    lower = path.name.lower()
    if lower.endswith((".mha", ".mhd")):
        data_file, fields = _header_fields(path)
        if data_file is None:
            raise InputError(path, "cannot read image (MetaImage header has no ElementDataFile)")
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if data_file.upper() == "LOCAL":
            return path, compressed
        if lower.endswith(".mha"):
            raise InputError(path, f"an .mha file must hold its own pixels (ElementDataFile = LOCAL), not '{data_file[:80]}'")
        return _confined_data_file(path, data_file), compressed
    if lower.endswith((".nrrd", ".nhdr")):
        data_file, fields = _header_fields(path)
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
    reader.SetImageIO(_image_io(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise InputError(path, f"cannot read image header ({_first_error_line(exc)})") from exc
    size = tuple(int(s) for s in reader.GetSize())
    if not 2 <= len(size) <= 4:
        raise InputError(path, f"{len(size)}-D image of size {size}; expected a 3-D volume (z, y, x)")
    components = int(reader.GetNumberOfComponents())
    try:  # bytes per component, from a 1-pixel image of the same pixel type
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).dtype.itemsize
    except RuntimeError as exc:
        raise InputError(path, f"unsupported pixel type ({reader.GetPixelIDTypeAsString()})") from exc
    check_declared_size(path, (*size, components), itemsize, max_voxels)
    shape = (*size, components)
    header = _nifti_header(path) if path.name.lower().endswith((".nii", ".nii.gz")) else b""
    nifti = _nifti_layout(header)
    if nifti is not None and nifti[2] < struct.unpack(nifti[0] + "i", header[:4])[0]:  # sizeof_hdr: 348 or 540
        # ITK would read the voxels from the wrong place (shifted data, no error).
        raise InputError(path, "NIfTI vox_offset is not a position after the header (forged or corrupt header)")
    if nifti is not None and nifti[1] in _NIFTI_STORED_BYTES:  # the stored size, not the rescaled one
        shape, itemsize = size, _NIFTI_STORED_BYTES[nifti[1]]
    data_bytes = os.path.getsize(source)
    if compressed:
        check_declared_size(path, shape, itemsize, max_voxels, deflate_bytes=data_bytes)
        if nifti is not None and nifti[1] in _NIFTI_STORED_BYTES:
            _check_gzip_complete(path, max(nifti[2], 0) + math.prod(size) * itemsize)
        if path.name.lower().endswith((".mha", ".mhd")):
            # ITK prints "Uncompress failed" and returns whatever it inflated: garbage, no error.
            with open(source, "rb") as fh:
                fh.seek(_local_pixel_offset(path) if source == path else 0)
                _check_inflates(path, fh, math.prod(shape) * itemsize, wbits=15, what="compressed MetaImage")
    elif source != path or path.name.lower().endswith((".mha", ".nii")):
        # Only the pixels count: a file holding its own also holds its header.
        pixel_bytes = data_bytes - _local_pixel_offset(path) if source == path else data_bytes
        check_declared_size(path, shape, itemsize, max_voxels, stored_bytes=max(pixel_bytes, 0))


def _first_error_line(exc: Exception) -> str:
    """SimpleITK raises RuntimeError with a multi-line message: its first error line."""
    text = str(exc)
    return next((line for line in text.splitlines() if "ERROR" in line or "error" in line), text).strip()[:200]


def _write_image(image, path: Path) -> None:
    """Write ``image`` at ``path``, which may be an :func:`lsmseg.io.atomic.atomic_output` temporary name.

    ITK writes into a hidden scratch folder beside the target, under the target's own name with a
    lower-cased suffix (ITK's writers accept only those), so that a ``.mhd``/``.nhdr`` header names
    its data file by its final name (not a temporary one). The data file becomes a companion of the
    output (:func:`lsmseg.io.atomic.companion_output`), renamed into place before the header; the
    scratch folder is removed whatever happens (and swept as a ``.partial-`` leftover after a kill).
    """
    import SimpleITK as sitk

    target = partial_target(path)
    suffix = _suffix(target)
    scratch = partial_path(target, ".d")
    try:
        scratch.mkdir()
        inner = scratch / (target.name[: len(target.name) - len(suffix)] + suffix)
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(inner))
        writer.SetImageIO(_image_io(target))
        writer.SetUseCompression(True)
        try:
            writer.Execute(image)
        except RuntimeError as exc:  # ITK's errors (disk full, no permission) are RuntimeErrors
            raise OutputError(target, f"cannot write output ({_first_error_line(exc)})") from exc
        for written in sorted(scratch.iterdir()):  # the data file of a detached header
            if written != inner:
                os.replace(written, companion_output(path, written.name))
        os.replace(inner, path)
    finally:
        remove_path(scratch)


class SitkFormat(VolumeFormat):
    """``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr`` (read whole: ITK has no lazy reads)."""

    name = "sitk"

    def read(self, path: Path, *, lazy: bool = False, max_voxels: int | None = None) -> Volume:
        import SimpleITK as sitk

        _check_sitk_size(path, max_voxels)
        try:
            image = sitk.ReadImage(str(path), imageIO=_image_io(path))
        except Exception as exc:
            raise InputError(path, f"cannot read image ({_first_error_line(exc)})") from exc
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise InputError(
                path, f"multi-channel image ({image.GetNumberOfComponentsPerPixel()} components); expected one channel"
            )
        size = image.GetSize()[::-1]
        if image.GetDimension() == 4 and size[0] == 1:  # a 4-D file with a single time point
            image = image[:, :, :, 0]
            size = image.GetSize()[::-1]
        check_array_shape(path, tuple(size))
        data = sitk.GetArrayFromImage(image)
        check_dtype(path, data.dtype)
        if data.dtype.kind == "f" and path.name.lower().endswith((".nii", ".nii.gz")):
            nonfinite = _nifti_nonfinite(path, data.shape)
            if nonfinite is not None:
                data[nonfinite] = np.nan  # restore what ITK silently zeroed, so callers can refuse it
        meta = {"origin": image.GetOrigin(), "direction": image.GetDirection(), "sitk_spacing": image.GetSpacing()}
        spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
        return Volume(data=data, spacing=spacing, path=path, fmt=self.name, meta=meta)  # type: ignore[arg-type]

    def write(self, array: np.ndarray, path: Path, *, like=None, spacing=None) -> None:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array)
        if spacing is not None:
            image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        if like is not None and like.fmt == self.name and like.shape == array.shape:
            image.SetOrigin(like.meta["origin"])
            image.SetDirection(like.meta["direction"])
        _write_image(image, Path(path))

    def write_blocks(self, blocks, path: Path, *, shape, dtype, like=None, spacing=None) -> None:
        """ITK's writers need the whole image: the blocks are assembled first (its readers hold it anyway)."""
        array = np.zeros(tuple(shape), dtype=dtype)
        for index, block in blocks:
            array[index] = block
        self.write(array, path, like=like, spacing=spacing)
