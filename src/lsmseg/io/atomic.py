"""The one atomic writer: every file lsmseg writes (masks, provenance, manifests, checkpoints, run
records, ONNX exports) is written under a hidden temporary name beside its target and renamed into
place only when complete, so that a crash or a full disk never leaves a half-written file. An output
made of two files (a ``.mhd``/``.nhdr`` header and its data file) registers the second one with
:func:`companion_output`: it is renamed into place first, the header last."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import InputError, OutputError

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
# The most a partial_path name adds to its target's name (a pid of up to 7 digits, Linux's largest 4194304).
PARTIAL_NAME_EXTRA = len(PARTIAL_PREFIX) + 7 + 1 + 8 + 1
_PARTIAL_PID = re.compile(re.escape(PARTIAL_PREFIX) + r"(\d+)-[0-9a-f]{8}-")


def partial_path(path: str | Path, suffix: str = "") -> Path:
    """A hidden temporary name beside ``path`` that carries this process's id (see :func:`sweep_partials`).

    Args:
        path: the target.
        suffix: appended to the name (e.g. ``.zarr`` for a scratch store beside the target).
    """
    path = Path(path)
    return path.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}{suffix}"


def partial_target(path: str | Path) -> Path:
    """The target a :func:`partial_path` name stands for (``.partial-<pid>-<id>-x.mhd`` -> ``x.mhd``
    in the same folder); any other path is its own target."""
    path = Path(path)
    match = _PARTIAL_PID.match(path.name)
    return path.parent / path.name[match.end():] if match and len(path.name) > match.end() else path


# Companion files of the atomic outputs being written, by temporary path: [(temporary, final), ...].
_companions: dict[Path, list[tuple[Path, Path]]] = {}


def companion_output(tmp: str | Path, name: str) -> Path:
    """A temporary path for a second file of the output being written at ``tmp``, named ``name``
    beside the target once in place (a detached header's data file).

    Within an :func:`atomic_output` block, the companion is renamed to ``name`` when the block
    succeeds, before the output itself (so that a reader never sees a header without its data),
    and removed with it when the block fails. Outside such a block, ``tmp`` is the target itself
    and the companion is written in place.

    Args:
        tmp: the path :func:`atomic_output` yielded.
        name: the companion's final file name, a plain name (no folder) in the target's folder.
    """
    tmp = Path(tmp)
    if not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"a companion file needs a plain file name, got {name!r}")
    final = tmp.parent / name
    companions = _companions.get(tmp)
    if companions is None:
        return final
    if any(done == final for _, done in companions) or final == partial_target(tmp):
        raise ValueError(f"companion file {name!r} is already part of this output")
    part = partial_path(final)
    companions.append((part, final))
    return part


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15; glibc >= 2.28 has the wrapper)
# What a system or file system without RENAME_EXCHANGE answers (NFS, FUSE, older kernels).
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


@functools.cache
def _renameat2():
    """libc's renameat2, or None (another system, an older C library)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step (renameat2's RENAME_EXCHANGE), so that
    neither name is ever missing; False where the system or file system cannot (nothing moved then).

    Raises:
        OSError: the exchange is supported but failed (no permission, ...).
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_path(path: Path) -> None:
    """Remove a file or a whole folder; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _move_aside(final: Path, kept: list) -> None:
    """Rename an existing ``final`` to a partial name, recorded in ``kept`` as ``(aside, final)``."""
    if final.exists() or final.is_symlink():
        aside = partial_path(final)
        os.replace(final, aside)
        kept.append((aside, final))


def refuse_replacing_another_kind(path: str | Path, folder: bool) -> None:
    """Raise :class:`OutputError` when ``path`` exists as a folder and a file is to be written there,
    or the other way round: what the user keeps there is never deleted to make room.

    A link counts as a file: it is replaced, never followed.

    Args:
        path: the target.
        folder: whether the output is a folder (plane folders, zarr stores).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    existing_folder = path.is_dir() and not path.is_symlink()
    if existing_folder != folder:
        found, wanted = ("a folder", "a file") if existing_folder else ("a file", "a folder")
        raise OutputError(path, f"already exists as {found}, but the output is {wanted}; refusing to replace it "
                                "(move it away or choose another output folder)")


def prepare_output(path: str | Path, folder: bool | None = None) -> Path:
    """Make ``path``'s folder and check that it can take ``path``, before any work is done.

    Args:
        path: the file or folder to write.
        folder: whether the output will be a folder, if known: then a target of the other kind is
            refused (:func:`refuse_replacing_another_kind`).

    Raises:
        OutputError: the folder cannot be made or written, or the target is of the other kind.
    """
    path = Path(path)
    if folder is not None:
        refuse_replacing_another_kind(path, folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path.parent, f"cannot create output folder: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise OutputError(path.parent, "output folder is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path, folder: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the target's suffix (writers choose the format by suffix) and starts
    with ``.partial-`` so that a crash leaves only an obviously unfinished hidden file, which is
    removed on any exception. An ``OSError`` (disk full, no permission) becomes an
    :class:`OutputError` naming ``path``. A previous output of the same kind (file or folder) is
    replaced; one of the other kind is refused (:func:`refuse_replacing_another_kind`).
    Companion files that the block registered (:func:`companion_output`) are renamed into place
    before ``path``; when anything fails, those already renamed are removed again with the
    temporary files, so no half of a two-file output is left.

    Args:
        path: the file or folder to write.
        folder: whether the output will be a folder, if known: then a target of the other kind is
            refused before the block runs (before any work), not only when renaming.
    """
    path = prepare_output(path, folder)
    tmp = partial_path(path)
    companions = _companions[tmp] = []
    placed: list[Path] = []
    kept: list[tuple[Path, Path]] = []  # (previous output moved aside, where it goes back on failure)
    try:
        yield tmp
        refuse_replacing_another_kind(path, tmp.is_dir() and not tmp.is_symlink())
        for _, final in companions:
            refuse_replacing_another_kind(final, folder=False)
        # The previous output is kept, not deleted, until the new one is in place: a rename that
        # fails (or a kill while a large old store would be deleted) must not lose it. A lone file
        # is renamed onto it, which replaces it atomically and keeps it on failure (a folder where
        # it goes was refused just above). A lone folder trades places with it in one step where
        # the file system can, so that readers never find the output missing; elsewhere the old one
        # is renamed aside first. A pair is never swapped file by file: an old header beside new
        # data reads as a wrong volume without an error, so its old files go aside before the new
        # ones come in (a reader finds it missing for a moment), the data before the header, so
        # that the header never names a missing file.
        lone_file = not companions and not tmp.is_dir()
        moves = [*companions, (tmp, path)]
        if companions:  # every old file of a pair aside (header first) before its first new file lands
            for _, final in reversed(moves):
                _move_aside(final, kept)
        for new, final in moves:
            if not lone_file and (final.exists() or final.is_symlink()):  # a lone folder's previous one
                if exchange_paths(new, final):  # which now sits at the partial name
                    kept.append((new, final))
                    placed.append(final)
                    continue
                _move_aside(final, kept)
            os.replace(new, final)
            placed.append(final)
    except BaseException as exc:
        previous = {aside for aside, _ in kept}
        for leftover in (tmp, *(part for part, _ in companions), *placed):
            if leftover not in previous:
                remove_path(leftover)
        restored: list[Path] = []
        try:
            for aside, final in reversed(kept):  # the data before the header, as they came
                os.replace(aside, final)
                restored.append(final)
        except OSError:  # the previous output cannot come back whole: no half of it is left either
            for leftover in (*(aside for aside, _ in kept), *restored):
                remove_path(leftover)
        if isinstance(exc, OSError) and not isinstance(exc, (InputError, OutputError)):
            raise OutputError(path, f"cannot write output: {exc.strerror or exc}") from exc
        raise
    finally:
        _companions.pop(tmp, None)
    for aside, _ in kept:  # after the new output is in place (a kill here leaves a partial to sweep)
        remove_path(aside)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    return write_bytes(text.encode("utf-8"), path)


def write_bytes(content: bytes, path: str | Path) -> Path:
    """Write ``content`` to ``path`` atomically (an interruption leaves the old file or the new, not half)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(content)
    return Path(path)


def write_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON, atomically (values JSON cannot hold are written as strings)."""
    return write_text(json.dumps(data, indent=2, default=str), path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: str | Path, stale_after_s: float = 3600.0, target: str | None = None) -> list[Path]:
    """Remove ``.partial-*`` leftovers of killed runs from ``folder``; return what was removed.

    A partial name carries its writer's pid: it is stale when that process is gone or is this one
    (called before this process writes). Names without a pid (older versions) are stale once
    untouched for ``stale_after_s``. Runs on other hosts sharing the folder are not seen.

    Args:
        folder: the output folder.
        stale_after_s: age after which a partial without a pid is removed.
        target: only the partials of this name (``x`` for ``.partial-<pid>-<id>-x``), for a folder
            holding other things than this program's outputs; None for every partial.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(PARTIAL_PREFIX):
            continue
        if target is not None and partial_target(entry).name != target:
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
            remove_path(entry)
            removed.append(entry)
            logger.info("removed %s (left by an interrupted run)", entry)
    return removed
