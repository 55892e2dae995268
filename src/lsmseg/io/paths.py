"""Names and places: volume names without their format suffix, where a mask goes, and the checks
that an output never replaces an input."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import OutputError, printable

TIFF_SUFFIXES = (".tif", ".tiff")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
SITK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
# Longest first, so that "x.ome.tif" loses ".ome.tif" and not just ".tif".
KNOWN_SUFFIXES = tuple(
    sorted((*OME_TIFF_SUFFIXES, *TIFF_SUFFIXES, *SITK_SUFFIXES, *ZARR_SUFFIXES), key=len, reverse=True)
)


def _natural_key(name: str) -> list:
    """Sort key so that z2 comes before z10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def natural_sorted(paths) -> list[Path]:
    """``paths`` sorted by name, numbers by value (``z2`` before ``z10``), case-insensitively."""
    return sorted((Path(p) for p in paths), key=lambda p: _natural_key(p.name))


def volume_name(path: str | Path) -> str:
    """Base name of a volume without its format suffix: ``brain01`` for ``brain01.nii.gz``."""
    path = Path(path)
    lower = path.name.lower()
    suffix = next((s for s in KNOWN_SUFFIXES if lower.endswith(s)), "")
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


OUTPUT_FORMATS = ("same", "zarr")


def output_path_for(input_path: str | Path, out_dir: str | Path, output_format: str = "same") -> Path:
    """Where a volume's mask goes in ``out_dir``.

    Args:
        input_path: the volume.
        out_dir: the output folder.
        output_format: ``"same"``: the same name and container (the challenge convention);
            ``"zarr"``: ``<name>.ome.zarr``.
    """
    if output_format == "zarr":
        return Path(out_dir) / f"{volume_name(input_path)}.ome.zarr"
    if output_format != "same":
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return Path(out_dir) / Path(input_path).name


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (by resolved path, or by inode when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` resolves (links followed) to somewhere below ``folder``."""
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def outside_folder(path: str | Path, folder: str | Path) -> Path | None:
    """Where ``path``, an entry listed from ``folder``, really leads when that is outside ``folder``
    (a link to elsewhere), else None. Nothing outside an input folder is read."""
    return None if _inside(path, folder) else Path(os.path.realpath(path))


def link_out_inside(tree: str | Path, folder: str | Path) -> tuple[Path, Path] | None:
    """The first link below the folder ``tree`` (a plane folder, a zarr store) that leads outside
    ``folder``, as ``(link, where it leads)``; None if there is none.

    Links are found by listing (``os.scandir``, never following them), so nothing outside is
    opened. Input folders use it on the volume folders they list: nothing outside the input is
    read. A path the user names is the user's choice and is not checked.

    Args:
        tree: the folder to search.
        folder: the boundary, usually the input folder ``tree`` was listed from.
    """
    pending = [os.fspath(tree)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = outside_folder(entry.path, folder)
                    if target is not None:
                        return Path(entry.path), target
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return None


def output_key(path: str | Path) -> str:
    """What names an output on disk: its resolved path, case-folded, because some file systems
    (macOS, Windows, SMB shares) take ``X.tif`` and ``x.tif`` for one file."""
    return os.path.realpath(path).casefold()


def colliding_outputs(targets) -> dict[str, list]:
    """Outputs that more than one target would write to (by :func:`output_key`).

    Args:
        targets: ``[(owner, output), ...]``: each output with what writes it (e.g. its input).

    Returns:
        ``{output: [owner, ...]}`` for every output written more than once, owners in order.
    """
    by_key: dict[str, tuple[str, list]] = {}
    for owner, output in targets:
        by_key.setdefault(output_key(output), (str(output), []))[1].append(owner)
    return {output: owners for output, owners in by_key.values() if len(owners) > 1}


def refuse_overwriting_inputs(pairs, input_folders=()) -> None:
    """Raise :class:`OutputError` when an output would replace (or sit inside) one of the inputs.

    Args:
        pairs: ``[(input, output), ...]``; every output is checked against every input, so that
            ``predict d/a.tif -o d`` and folder mode with the same input and output folder are
            refused before any work.
        input_folders: the folders the inputs were listed from (``predict d -o d/masks``, folder
            mode's input folder): no output may be one or lie inside one. Files among them are
            ignored, so that a file's neighbours (``predict d/a.tif -o d/masks``) stay allowed.
    """
    pairs = [(Path(i), Path(o)) for i, o in pairs]
    inputs = [i for i, _ in pairs] + [Path(f) for f in input_folders if Path(f).is_dir()]
    for _, output in pairs:
        for input_path in inputs:
            if same_file(input_path, output):
                raise OutputError(output, f"output would overwrite the input {printable(input_path)}; "
                                          "choose another output folder")
            if input_path.is_dir() and _inside(output, input_path):
                raise OutputError(output, f"output would be written inside the input {printable(input_path)}; "
                                          "choose another output folder")
