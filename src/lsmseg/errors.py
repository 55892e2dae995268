"""Exceptions whose messages are one clear line: what went wrong, and with which file."""

from __future__ import annotations

from pathlib import Path


class LsmsegError(Exception):
    """Base class: anything the user can fix (bad input, bad config, bad weights)."""


class InputError(LsmsegError):
    """An input volume cannot be used; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}")


class OutputError(LsmsegError):
    """An output cannot be written (unwritable folder, full disk, ...)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class ProvenanceError(OutputError):
    """The mask was written but its provenance JSON was not. ``record`` is the volume's result
    (``ok`` True, ``provenance_error`` set), so that front ends do not report the mask as missing."""

    def __init__(self, cause: LsmsegError, output_path: str | Path, record: dict):
        path = getattr(cause, "path", output_path)
        reason = getattr(cause, "reason", str(cause))
        super().__init__(path, f"{reason} (the mask {output_path} was written; only its provenance record is missing)")
        self.record = {**record, "ok": True, "provenance_error": str(self)}


class WeightsError(LsmsegError):
    """Weights are missing, tampered with (checksum mismatch) or for another model."""


class ConfigError(LsmsegError):
    """A YAML config or manifest has an unknown key, a wrong type or a bad value."""
