"""Where the real (never committed) data lives: ``--data``, else ``LSMSEG_DATA``, else ``../shared/data/real``.

The last is the development layout: a ``shared/`` folder beside the repository checkout. Training
configs write real-data paths as ``$LSMSEG_DATA/...``; tests, benchmarks and evaluation scripts use
:func:`real_data_root` too, so one variable moves all of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_DATA = "LSMSEG_DATA"
CHECKOUT_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
_VARIABLE = re.compile(r"^\$(?:\{LSMSEG_DATA\}|LSMSEG_DATA)(?=/|$)")


def real_data_root(explicit: str | Path | None = None) -> Path:
    """The real-data folder: ``explicit`` (a ``--data`` option), else ``$LSMSEG_DATA``, else the checkout default.

    Args:
        explicit: a folder given on the command line; None to use the environment or the default.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    return CHECKOUT_DEFAULT


def expand_data_path(text: str, root: str | Path | None = None) -> str:
    """``$LSMSEG_DATA/x`` or ``${LSMSEG_DATA}/x`` -> ``<real_data_root(root)>/x``; other paths unchanged."""
    return _VARIABLE.sub(lambda _: str(real_data_root(root)).replace("\\", "/"), str(text))
