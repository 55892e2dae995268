"""Forged files for the hardening tests: headers that lie about their size, written by hand."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def forged_tiff(path: Path, pages: int, width: int, height: int, compression: int = 1, data: bytes | None = None) -> Path:
    """A classic little-endian TIFF of ``pages`` IFDs whose strips all point at the same small data.

    Each page claims ``width`` x ``height`` uint8 pixels in one strip; the file holds only
    ``data`` (default: one deflate stream of a few zero rows, or 16 raw bytes) once.
    """
    if data is None:
        data = zlib.compress(b"\0" * 4096) if compression == 8 else b"\0" * 16
    entries = 9
    ifd_size = 2 + entries * 12 + 4
    data_offset = 8 + pages * ifd_size
    out = bytearray(b"II*\0" + struct.pack("<I", 8))
    for i in range(pages):
        next_offset = 8 + (i + 1) * ifd_size if i < pages - 1 else 0
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, 1),
                (273, 4, data_offset), (277, 3, 1), (278, 4, height), (279, 4, len(data))]
        out += struct.pack("<H", entries)
        for tag, kind, value in tags:
            out += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        out += struct.pack("<I", next_offset)
    out += data
    path.write_bytes(bytes(out))
    return path


def metaimage(path: Path, dims=(8, 8, 4), element="MET_UCHAR", data_file="LOCAL", payload: bytes | None = None,
              extra: str = "") -> Path:
    """A MetaImage header (.mha/.mhd) with ``payload`` appended when the data is LOCAL."""
    header = (
        "ObjectType = Image\nNDims = 3\n"
        f"DimSize = {' '.join(map(str, dims))}\nElementType = {element}\n{extra}"
        f"ElementDataFile = {data_file}\n"
    ).encode()
    path.write_bytes(header + (payload or b""))
    return path
