"""Where the real (never committed) data lives: ``--data``, else ``LSMSEG_DATA``, else ``../shared/data/real``.

The last is the development layout: a ``shared/`` folder beside the repository checkout; an
installed (non-checkout) package has no such default and asks for one of the first two. Training
configs write real-data paths as ``$LSMSEG_DATA/...``; tests, benchmarks and evaluation scripts use
:func:`real_data_root` too, so one variable moves all of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

ENV_DATA = "LSMSEG_DATA"


def _checkout_default() -> Path | None:
    """``../shared/data/real`` beside the source checkout this package runs from; None when it is
    installed elsewhere (site-packages' grandparent is no checkout, so its sibling means nothing)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "lsmseg").is_dir():
        return checkout.parent / "shared" / "data" / "real"
    return None


CHECKOUT_DEFAULT = _checkout_default()
_VARIABLE = re.compile(r"^\$(?:\{LSMSEG_DATA\}|LSMSEG_DATA)(?=/|$)")


def real_data_root(explicit: str | Path | None = None) -> Path:
    """The real-data folder: ``explicit`` (a ``--data`` option), else ``$LSMSEG_DATA``, else the checkout default.

    Args:
        explicit: a folder given on the command line; None to use the environment or the default.

    Raises:
        ConfigError: nothing given, nothing in the environment, and no checkout to take the default from.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    if CHECKOUT_DEFAULT is None:
        raise ConfigError(f"the real-data folder is unknown: set {ENV_DATA} or pass --data "
                          "(lsmseg is not run from a source checkout, whose default is ../shared/data/real)")
    return CHECKOUT_DEFAULT


def expand_data_path(text: str, root: str | Path | None = None) -> str:
    """``$LSMSEG_DATA/x`` or ``${LSMSEG_DATA}/x`` -> ``<real_data_root(root)>/x``; other paths unchanged."""
    return _VARIABLE.sub(lambda _: str(real_data_root(root)).replace("\\", "/"), str(text))
