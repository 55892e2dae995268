"""Recompress wheels with LZMA so that more of them fit in a device call's 64 MiB working tree.

A wheel is a zip archive; pip installs it through Python's ``zipfile``, which reads LZMA members
(method 14) as well as deflated ones, and checks each file against the wheel's RECORD hashes,
which hold the files' contents, not their compressed bytes. So a wheel whose members are
recompressed with LZMA installs exactly as the original does, and is smaller: SimpleITK 2.5.7
(one 272 MB shared library) goes from 52.8 MB to 28.8 MB, which is what lets it travel beside the
shipped weights (docs/gpu_check.md).

    python scripts/repack_wheels.py .whl            # every *.whl in the folder, in place
    python scripts/repack_wheels.py a.whl b.whl     # these wheels

Each wheel is replaced only after its new copy has been written whole and read back (every
member's CRC checked, the same names and contents); a wheel already in LZMA is left as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path


def is_lzma(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_LZMA for info in archive.infolist() if info.file_size)


def repack(path: Path) -> tuple[int, int]:
    """Rewrite the wheel ``path`` with LZMA members, in place; return its size before and after (bytes)."""
    path = Path(path)
    before = path.stat().st_size
    if is_lzma(path):
        return before, before
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w") as target:
            for info in source.infolist():
                # Keep each member's name, date and permissions; only the compression changes.
                target.writestr(info, source.read(info), compress_type=zipfile.ZIP_LZMA)
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp) as target:
            bad = target.testzip()
            if bad is not None:
                raise OSError(f"{path}: the recompressed copy fails its CRC check at {bad}")
            if [(i.filename, i.CRC, i.file_size) for i in source.infolist()] != \
                    [(i.filename, i.CRC, i.file_size) for i in target.infolist()]:
                raise OSError(f"{path}: the recompressed copy does not hold the same files")
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # (mkstemp made it private)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return before, path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="wheels, or folders whose *.whl to repack")
    args = parser.parse_args(argv)
    wheels = []
    for path in args.paths:
        if path.is_dir():
            wheels += sorted(path.glob("*.whl"))
        elif path.is_file():
            wheels.append(path)
        else:
            print(f"{path}: no such wheel or folder", file=sys.stderr)
            return 2
    total_before = total_after = 0
    for wheel in wheels:
        try:
            before, after = repack(wheel)
        except (OSError, zipfile.BadZipFile) as exc:
            print(f"{wheel}: not repacked ({exc})", file=sys.stderr)
            return 1
        total_before, total_after = total_before + before, total_after + after
        print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    print(f"{len(wheels)} wheel(s): {total_before / 2**20:.1f} -> {total_after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
