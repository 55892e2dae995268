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


class WeightsError(LsmsegError):
    """Weights are missing, tampered with (checksum mismatch) or for another model."""


class ConfigError(LsmsegError):
    """A YAML config or manifest has an unknown key, a wrong type or a bad value."""
