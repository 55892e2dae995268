"""What the command-line front ends share (:mod:`lsmseg.cli` for ``predict``,
:mod:`lsmseg.challenge.runner` for ``challenge``/``serve``, and the plug-in commands): argparse
types, help texts, and when to draw progress bars.

Every option value is checked when it is parsed, so that a bad one is argparse's one-line usage
error (exit 2), never a ValueError from deep inside the core. An option both front ends define
uses the same type here, so that they accept and refuse the same values.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable

from .structures import unknown_structure

ENGINE_HELP = ("auto: on CPU OpenVINO (lsmseg[openvino]), else ONNX Runtime (lsmseg[onnx]), when installed, "
               "else PyTorch")
STRUCTURE_HELP = ("structure to segment: a SELMA3D 2026 case prefix or one of its aliases (default: each file "
                  "name's prefix picks it, e.g. cfos_neuron_012.tif, and the manifest's default model runs)")


def progress_wanted(quiet: bool = False) -> bool:
    """Whether to draw progress bars: never with ``-q``; else as ``LSMSEG_PROGRESS`` says (1 or 0);
    else only when stderr is a terminal (in a log file they are screens of escape codes).

    Raises:
        argparse.ArgumentTypeError (a ValueError too): ``LSMSEG_PROGRESS`` is neither 1 nor 0 (``yes``
            silently meant no progress bars).
    """
    if quiet:
        return False
    setting = os.environ.get("LSMSEG_PROGRESS", "").strip()
    if setting not in ("", "0", "1"):
        raise EnvironmentValueError(f"LSMSEG_PROGRESS: expected 1 (progress bars) or 0 (none), got {setting!r}")
    return setting == "1" if setting else sys.stderr.isatty()


class EnvironmentValueError(argparse.ArgumentTypeError, ValueError):
    """A bad value in an environment variable: a usage error wherever argparse's or a ValueError is."""


def zyx(kind: type = int) -> Callable[[str], tuple]:
    """An argparse type: three positive numbers ``Z,Y,X`` (or ``ZxYxX``) of ``kind``."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected Z,Y,X {kind.__name__} values, got {text!r}") from None
        if len(values) != 3 or not all(0 < v < math.inf for v in values):
            raise argparse.ArgumentTypeError(f"expected three positive numbers Z,Y,X, got {text!r}")
        return values

    return parse


def _whole_number(text: str) -> int | None:
    """``text`` as a whole number (``1000`` or ``1e9``), or None (not a number, a fraction, inf, nan)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``1e9`` too)."""
    value = _whole_number(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (``1e9`` too)."""
    value = _whole_number(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1), e.g. a probability threshold."""
    value = _number(text)
    if not 0.0 < value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a value in (0, 1), got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1), e.g. the window overlap."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1), got {text}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number > 0, e.g. a size in MiB."""
    value = _number(text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite value > 0, got {text}")
    return value


def input_scale(text: str) -> float | tuple[float, float, float]:
    """An argparse type: a test-time input scale (``InferenceSettings.input_scale``), one factor
    ``X`` or three ``Z,Y,X`` (or ``ZxYxX``), each within :data:`lsmseg.config.INPUT_SCALE_RANGE`."""
    from .config import checked_input_scale

    parts = text.lower().replace("x", ",").split(",")
    try:
        factors = [float(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number X or three Z,Y,X, got {text!r}") from None
    try:
        return checked_input_scale(factors[0] if len(factors) == 1 else factors, what="input scale",
                                   written=text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _number(text)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite value >= 0, got {text}")
    return value


def block_size(text: str) -> int | tuple[int, int, int]:
    """An argparse type: one positive edge ``N`` or three, ``Z,Y,X``."""
    if text.strip().isdigit():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"block size must be positive, got {text}")
        return value
    return zyx(int)(text)


def part(text: str) -> tuple[int, int]:
    """An argparse type: ``K/N``, the K-th of N shares (1-based)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 2/4, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= K <= N, got {text!r}")
    return k, n


def dask_address(text: str) -> str:
    """A dask scheduler's address (``tcp://host:8786``, ``host:8786``), checked by distributed's own
    parser where it is installed (without it, ``--scheduler dask`` reports the missing package)."""
    try:
        from distributed.comm.addressing import parse_address, parse_host_port
    except ImportError:
        return text
    from distributed.comm.registry import backends

    try:
        scheme, location = parse_address(text)
        if scheme not in backends:
            raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(sorted(backends))}")
        if scheme in ("tcp", "tls") and not 0 < parse_host_port(location)[1] < 65536:
            raise ValueError("the port must be 1-65535")
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"not a dask scheduler address ({exc}); expected e.g. tcp://host:8786") from None
    return text


def structure(text: str) -> str:
    """An argparse type: a structure name as :func:`lsmseg.structures.known_structure` takes it
    (kept as given: a manifest entry may list an alias). A typo would silently lose the structure's
    settings, so it is refused with the valid names."""
    reason = unknown_structure(text)
    if reason is not None:
        raise argparse.ArgumentTypeError(reason)
    return text.strip()  # as known_structure read it: ' vessels' would miss its settings


_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (and torch's ``cpu:0``), the devices lsmseg runs on. Whether that
    device is present is checked when the model is placed (:func:`lsmseg.model.select_device`): a
    misspelt name is a usage error, a missing GPU a failed run."""
    if not _DEVICE.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N a GPU index), got {text!r}")
    return text.strip()


def choice(choices) -> Callable[[str], str]:
    """A type that accepts one of ``choices``: for values argparse's ``choices`` does not check
    (environment variables read outside the parser)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse
