"""The challenge front end: which mode runs, SIGTERM handling, exit codes, and the ``lsmseg
challenge`` / ``lsmseg serve`` commands (what the container's entrypoint runs).

Every failure is one ``ERROR: <file>: <reason>`` line; see :func:`run` for the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import threading
from pathlib import Path

from .. import argtypes
from ..config import parse_mirror_axes
from ..errors import EXIT_FAILED, EXIT_TERMINATED, EXIT_USAGE, LsmsegError, single_line
from ..inference.engines import ENGINES
from .exec import run_exec
from .folder import run_folder
from .invoke import run_invoke
from .settings import (
    DEFAULT_HOST, DEFAULT_INPUT, DEFAULT_INPUT_SLUG, DEFAULT_OUTPUT, DEFAULT_OUTPUT_SLUG, DEFAULT_PORT, MODES,
    ChallengeSettings,
)

logger = logging.getLogger(__name__)


def auto_mode(input_dir: Path) -> str:
    """exec when the Grand Challenge layout (``/input/images``) is there, folder otherwise."""
    return "exec" if (input_dir / "images").is_dir() else "folder"


RUNNERS = {"folder": run_folder, "exec": run_exec, "invoke": run_invoke}


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``): unwinds like KeyboardInterrupt, so that the atomic writer
    removes its partial output."""


@contextlib.contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(mode: str | None, settings: ChallengeSettings, predictor=None) -> int:
    """Run one mode. Exit codes: 0 every volume segmented (or none found), 1 any failure
    (bad volume, unwritable output, missing or tampered weights), 2 bad arguments, 143 stopped by
    SIGTERM in folder and exec modes (unfinished outputs removed; invoke mode's server exits 0).
    Ctrl-C is not caught here: KeyboardInterrupt reaches the caller (``lsmseg`` exits 130)."""
    mode = mode or auto_mode(settings.input_dir)
    if mode not in RUNNERS:
        logger.error("unknown mode '%s' (expected one of %s)", mode, ", ".join(MODES))
        return EXIT_USAGE
    logger.info("lsmseg %s mode: %s -> %s", mode, settings.input_dir, settings.output_dir)
    try:
        if mode == "invoke":  # the server handles SIGTERM itself
            return RUNNERS[mode](settings, predictor)
        with _sigterm_unwinds():
            return RUNNERS[mode](settings, predictor)
    except LsmsegError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except Terminated:
        logger.error("terminated (SIGTERM); unfinished outputs were removed")
        return EXIT_TERMINATED
    except MemoryError:
        logger.error("%s: out of memory", settings.input_dir)
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unforeseen file: still one line, never a traceback
        logger.error("unexpected %s: %s", type(exc).__name__, single_line(exc)[:300])
        logger.debug("traceback", exc_info=True)
        return EXIT_FAILED


# ---------------------------------------------------------------------------------- CLI


def _env_path(name: str, default: Path | None) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else default


def _env_value(name: str, parse, default=None):
    """Environment variable ``name`` checked by its option's type (``default`` when unset or empty).

    Read here rather than as the option's default, so that a bad value's error names the variable.

    Raises:
        argparse.ArgumentTypeError: a bad value (:func:`run_challenge_command`: exit code 2).
    """
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from None


def _add_options(p: argparse.ArgumentParser, with_mode: bool) -> None:
    env = os.environ.get
    if with_mode:
        p.add_argument("--mode", default=env("LSMSEG_MODE") or None, metavar="|".join(MODES),
                       help="folder, exec or invoke (env LSMSEG_MODE; default: exec if INPUT/images exists, else folder)")
    p.add_argument("--input", type=Path, default=_env_path("LSMSEG_INPUT", DEFAULT_INPUT),
                   help="input folder (env LSMSEG_INPUT, default /input)")
    p.add_argument("--output", type=Path, default=_env_path("LSMSEG_OUTPUT", DEFAULT_OUTPUT),
                   help="output folder (env LSMSEG_OUTPUT, default /output)")
    p.add_argument("--input-slug", default=env("LSMSEG_INPUT_SLUG") or DEFAULT_INPUT_SLUG,
                   help=f"exec/invoke input socket slug (env LSMSEG_INPUT_SLUG, default {DEFAULT_INPUT_SLUG})")
    p.add_argument("--output-slug", default=env("LSMSEG_OUTPUT_SLUG") or DEFAULT_OUTPUT_SLUG,
                   help=f"exec/invoke output socket slug (env LSMSEG_OUTPUT_SLUG, default {DEFAULT_OUTPUT_SLUG})")
    p.add_argument("--host", default=env("LSMSEG_HOST") or DEFAULT_HOST,
                   help=f"invoke: address to listen on (env LSMSEG_HOST, default {DEFAULT_HOST}; the invoke image sets 0.0.0.0)")
    p.add_argument("--port", default=env("LSMSEG_PORT") or str(DEFAULT_PORT),
                   help=f"invoke: port (env LSMSEG_PORT, default {DEFAULT_PORT})")
    p.add_argument("--weights", type=Path, default=None, metavar="MANIFEST",
                   help="weights: a manifest, a folder holding one, or a model tarball (env LSMSEG_WEIGHTS; "
                   "default: /opt/ml/model, then the image's weights)")
    # --structure, --device, --engine and --mirror-axes fall back to their environment variables in
    # settings_from_args (_env_value), so that a bad value there is named as such.
    p.add_argument("--structure", type=argtypes.structure, help=f"{argtypes.STRUCTURE_HELP}; env LSMSEG_STRUCTURE")
    p.add_argument("--device", type=argtypes.device,
                   help="torch device (env LSMSEG_DEVICE; default cuda when visible, else cpu)")
    p.add_argument("--engine", choices=ENGINES,
                   help=f"network runtime (env LSMSEG_ENGINE; default auto); {argtypes.ENGINE_HELP}")
    p.add_argument("--mirror-axes", type=parse_mirror_axes, metavar="none|all|ZYX",
                   help="test-time mirroring (env LSMSEG_MIRROR_AXES; default: the manifest's, per structure; "
                   "none: one pass per window, e.g. on a CPU without time for 8)")
    p.add_argument("--mask-value", type=int, choices=[1, 255], default=1,
                   help="foreground value (1 for the challenge; 255 for viewers; default: %(default)s)")
    p.add_argument("--max-voxels", type=argtypes.positive_int, default=None, metavar="N",
                   help="refuse inputs that declare more voxels (env LSMSEG_MAX_VOXELS; default 2^33)")
    p.set_defaults(func=run_challenge_command)


def add_challenge_commands(subparsers) -> None:
    """Register ``lsmseg challenge`` and ``lsmseg serve`` (called by lsmseg.cli)."""
    p = subparsers.add_parser(
        "challenge",
        help="container front end: folder, exec (Grand Challenge) or invoke (HTTP) mode",
        description="Segment /input into /output the way the container does: folder mode (every volume, same "
        "name and format), exec mode (Grand Challenge: INPUT/images/<input-slug>/ -> "
        "OUTPUT/images/<output-slug>/output.mha) or invoke mode (HTTP server: GET /health, POST /invoke). "
        "Exit code 0: all segmented or nothing to do; 1: any failure; 2: bad arguments; 143: stopped by "
        "SIGTERM, 130: by Ctrl-C (folder and exec modes; the unfinished output is removed).",
    )
    _add_options(p, with_mode=True)
    s = subparsers.add_parser(
        "serve",
        help="Grand Challenge invoke server (same as challenge --mode invoke)",
        description="HTTP server for the Grand Challenge invoke API: loads the model once, GET /health -> 200 when "
        "ready, POST /invoke -> reads INPUT/inputs.json, writes OUTPUT/images/<output-slug>/output.mha, 201.",
    )
    _add_options(s, with_mode=False)
    s.set_defaults(mode="invoke")


# Grand Challenge's socket slugs (Django slugs). A slug names one folder below images/: '/x' or
# '../x' would put the mask outside the output folder (or read the case from outside the input).
_SLUG = re.compile(r"[A-Za-z0-9_-]+")


def settings_from_args(args) -> ChallengeSettings:
    """The challenge settings from parsed ``challenge``/``serve`` arguments and the environment
    (``LSMSEG_STRUCTURE``, ``LSMSEG_ENGINE``, ``LSMSEG_MIRROR_AXES`` where the option is not given,
    ``LSMSEG_PROGRESS``, ``LSMSEG_PROVENANCE_DIR``).

    Raises:
        argparse.ArgumentTypeError: a bad port or slug, or a bad value in one of those variables.
    """
    try:
        port = int(args.port)
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535, got {args.port!r}") from None
    for option, slug in (("--input-slug", args.input_slug), ("--output-slug", args.output_slug)):
        if not _SLUG.fullmatch(slug):
            raise argparse.ArgumentTypeError(
                f"{option} (env LSMSEG_{option[2:].upper().replace('-', '_')}): a socket slug is one folder name "
                f"of letters, digits, '-' and '_', got {slug!r}")
    return ChallengeSettings(
        input_dir=args.input,
        output_dir=args.output,
        input_slug=args.input_slug,
        output_slug=args.output_slug,
        weights=args.weights,
        structure=args.structure or _env_value("LSMSEG_STRUCTURE", argtypes.structure),
        device=args.device or _env_value("LSMSEG_DEVICE", argtypes.device),
        engine=args.engine or _env_value("LSMSEG_ENGINE", argtypes.choice(ENGINES), "auto"),
        # () (--mirror-axes none) is a choice, not a missing value.
        mirror_axes=(args.mirror_axes if args.mirror_axes is not None
                     else _env_value("LSMSEG_MIRROR_AXES", parse_mirror_axes)),
        mask_value=args.mask_value,
        progress=argtypes.progress_wanted(getattr(args, "quiet", False)),
        provenance_dir=_env_path("LSMSEG_PROVENANCE_DIR", None),
        host=args.host,
        port=port,
        max_voxels=args.max_voxels,
    )


def run_challenge_command(args) -> int:
    """``lsmseg challenge`` / ``lsmseg serve``: run the chosen mode; exit codes as :func:`run` says."""
    try:
        settings = settings_from_args(args)
    except argparse.ArgumentTypeError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    return run(args.mode, settings)
