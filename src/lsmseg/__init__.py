"""lsmseg: semantic segmentation of 3D light-sheet microscopy volumes."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("lsmseg")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

__all__ = ["__version__"]
