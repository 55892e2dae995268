"""Exceptions whose messages are one clear line (what went wrong, and with which file), and the
exit codes every command shares."""

from __future__ import annotations

import signal
from pathlib import Path

# Exit codes of `lsmseg` and the container: 0 all done (or nothing to do), 1 any failure (bad input,
# unwritable output, missing or tampered weights), 2 bad arguments; SIGTERM and Ctrl-C as shells do.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT


def printable(text) -> str:
    """``text`` (a path, a reason) made safe for one log line: control characters escaped.

    File names are untrusted: one named ``"bad\\nERROR: fake.tif"`` must not print a second line.
    """
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def single_line(text) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def one_line(path: str | Path, reason: str) -> str:
    """The message of every file error: ``"<path>: <reason>"``, on one line whatever the file is named."""
    return f"{printable(path)}: {printable(single_line(reason))}"


class LsmsegError(Exception):
    """Base class: anything the user can fix (bad input, bad config, bad weights)."""


class FileError(LsmsegError):
    """A file cannot be read or written; ``str()`` is ``"<path>: <reason>"`` (:func:`one_line`), and
    ``reason`` is kept on one line for front ends that print it apart."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = single_line(reason)
        super().__init__(f"{printable(self.path)}: {printable(self.reason)}")  # one_line, flattened once

    def __reduce__(self):
        # An exception pickles as type(*args), and args here is the message, not (path, reason):
        # rebuilt from its args and attributes instead (process pools, plain pickle).
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, state):
    error = cls.__new__(cls, *args)  # BaseException.__new__ sets args
    error.__dict__.update(state)
    return error


class InputError(FileError):
    """An input volume cannot be used."""


class OutputError(FileError):
    """An output cannot be written (unwritable folder, full disk, ...)."""


class ProvenanceError(OutputError):
    """The mask was written but its provenance JSON was not. ``record`` is the provenance record
    that could not be written, so that front ends do not report the mask as missing."""

    def __init__(self, cause: LsmsegError, output_path: str | Path, record: dict):
        path = getattr(cause, "path", output_path)
        reason = getattr(cause, "reason", str(cause))
        super().__init__(path, f"{reason} (the mask {output_path} was written; only its provenance record is missing)")
        self.record = record


class WeightsError(LsmsegError):
    """Weights are missing, tampered with (checksum mismatch) or for another model."""


class ConfigError(LsmsegError):
    """A YAML config or manifest has an unknown key, a wrong type or a bad value."""
