"""The ``lsmseg`` command line: a thin front end over the package's core.

``predict`` and the challenge commands (``challenge``, ``serve``) are the inference image's own.
Other commands come from the ``lsmseg.commands`` entry points of the installed distribution
(pyproject.toml): ``phantom`` (:mod:`lsmseg.synth`), ``pretrain``/``finetune``/``export``
(``lsmseg_training``) and ``evaluate`` (``lsmseg_evaluation``). A command whose package is not
installed (the slim image has neither training, evaluation nor phantoms) is simply absent.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from . import __version__, argtypes
from .argtypes import zyx  # noqa: F401 (lsmseg.synth and lsmseg_evaluation import it from here)
from .challenge.runner import add_challenge_commands
from .config import parse_mirror_axes
from .allocator import map_large_buffers_for
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, LsmsegError, one_line, single_line
from .inference.blocks import DEFAULT_WINDOW_CACHE_BYTES
from .inference.engines import ENGINES
from .resources import fit_threads_to_cpus

logger = logging.getLogger("lsmseg")

COMMANDS_GROUP = "lsmseg.commands"


class UsageError(Exception):
    """A bad option value or combination found after parsing: one ERROR line and exit code 2
    (:data:`EXIT_USAGE`), like argparse's own usage errors."""


def select_part(items: list, part: tuple[int, int] | None) -> list:
    """The K-th of N interleaved shares (1-based): every N-th item from the K-th."""
    if part is None:
        return list(items)
    k, n = part
    return list(items)[k - 1 :: n]


def add_predict_command(subparsers) -> None:
    """Register ``lsmseg predict`` (every option value is checked as it is parsed: :mod:`.argtypes`)."""
    p = subparsers.add_parser(
        "predict",
        help="segment volumes with trained weights",
        description="Segment 3-D volumes. Each INPUT is a volume (TIFF stack, NIfTI, MHA/NRRD, zarr, a folder "
        "of 2-D TIFF planes) or a folder of volumes. Masks are written to OUT with the same name and "
        "format as their input, plus a provenance JSON beside each. Progress bars are drawn when stderr is a "
        "terminal (env LSMSEG_PROGRESS=1: always, 0: never; -q: never).",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="volume files or folders")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument("--weights", type=Path, metavar="MANIFEST",
                   help="weights: a manifest, a folder holding one, or a model tarball (default: LSMSEG_WEIGHTS, "
                   "a model at /opt/ml/model, then the installed weights)")
    p.add_argument("--structure", type=argtypes.structure, help=argtypes.STRUCTURE_HELP)
    p.add_argument("--device", type=argtypes.device, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    p.add_argument("--threshold", type=argtypes.probability, help="probability threshold (default: the manifest's, per structure; a value given here applies "
                   "to every structure)")
    p.add_argument("--min-component-voxels", type=argtypes.non_negative_int, metavar="N",
                   help="remove connected components smaller than N voxels (default: the manifest's, per structure; "
                   "0 keeps all)")
    p.add_argument("--intensity-floor", type=argtypes.non_negative, metavar="X",
                   help="never mark voxels whose normalised intensity is below X (1 = the volume's 99.5th percentile, "
                   "1 + ln x above it; default: the manifest's, per structure; 0 turns it off)")
    p.add_argument("--input-scale", type=argtypes.input_scale, metavar="X|Z,Y,X",
                   help="resample every volume by X per axis, or by Z,Y,X (one factor per axis), before the network, "
                   "and the logits back (test-time rescaling; the volume is then predicted in memory; default: the "
                   "manifest's, per structure; 1: the volume's own grid)")
    p.add_argument("--overlap", type=argtypes.fraction,
                   help="window overlap as a fraction in [0, 1) (default: the manifest's)")
    p.add_argument("--batch-size", type=argtypes.positive_int, dest="sw_batch_size", metavar="N",
                   help="windows per forward pass (default: the manifest's)")
    p.add_argument("--mirror-axes", type=parse_mirror_axes, metavar="none|all|ZYX",
                   help="test-time mirroring: also run every window flipped along each combination of these axes "
                   "and average (all: 8 passes per window; default: the manifest's, per structure)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: fp16/bf16 autocast on CUDA, fp32 on CPU (default: %(default)s)")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="do not resample inputs whose voxel spacing differs from the model's")
    p.add_argument("--mask-value", type=int, choices=[1, 255], default=1,
                   help="foreground value in the masks (255 is easier to see in viewers; default: %(default)s)")
    p.add_argument("--max-voxels", type=argtypes.positive_int, metavar="N",
                   help="refuse inputs whose headers declare more voxels, before reading them "
                   "(default: env LSMSEG_MAX_VOXELS, else 2^33 = 8.6e9)")
    p.add_argument("--save-probabilities", type=Path, metavar="DIR", dest="probabilities_dir",
                   help="also write each volume's foreground probability to DIR, same name and format as its mask")
    # No default here, so that a --probability-dtype without --save-probabilities can be refused.
    p.add_argument("--probability-dtype", choices=["uint8", "float16"],
                   help="with --save-probabilities: uint8: p = value/255 (default); float16 (float32 in NIfTI/MHA/NRRD)")
    p.add_argument("--preview", action="store_true",
                   help="also write a picture of each mask beside it, <mask name>.preview.png: the input's "
                   "maximum projection along z in grey, the mask's in magenta over it")
    scale = p.add_argument_group("large volumes and throughput")
    scale.add_argument("--output-format", choices=["same", "zarr"], default="same",
                       help="same: the input's container (TIFF written plane by plane); zarr: OME-Zarr <name>.ome.zarr "
                       "(default: %(default)s)")
    scale.add_argument("--block-size", type=argtypes.block_size, metavar="N|Z,Y,X",
                       help="output block edge in voxels; memory follows it, not the volume (default: blocks of at most 256^3 voxels, as few as possible)")
    scale.add_argument("--window-cache-mb", type=argtypes.non_negative_int, metavar="MB", default=DEFAULT_WINDOW_CACHE_BYTES >> 20,
                       help="memory for keeping the outputs of windows on block borders for the next blocks, so "
                            "that each window runs once (default: %(default)s; 0: they run once per block they touch)")
    scale.add_argument("--no-skip-background", dest="skip_background", action="store_false",
                       help="run the network on uniformly dark windows too (default: skip them)")
    scale.add_argument("--compile", action="store_true", help="torch.compile the model (slow start; off by default)")
    scale.add_argument("--engine", choices=ENGINES, default="auto",
                       help=f"network runtime; {argtypes.ENGINE_HELP} (default: %(default)s)")
    scale.add_argument("--scheduler", choices=["local", "dask"], default="local",
                       help="dask: spread each volume's blocks over dask.distributed workers (default: %(default)s)")
    scale.add_argument("--address", type=argtypes.dask_address, metavar="tcp://HOST:PORT",
                       help="with --scheduler dask: the dask scheduler to use (default: a LocalCluster, one worker "
                       "per GPU)")
    scale.add_argument("--workers", type=argtypes.positive_int, metavar="N",
                       help="with --scheduler dask: LocalCluster workers (default: one per GPU, or 1)")
    scale.add_argument("--part", type=argtypes.part, metavar="K/N",
                       help="process only the K-th of N interleaved shares of the input volumes (1-based), "
                       "for running N independent jobs")
    p.set_defaults(func=run_predict)


def _check_combinations(args) -> None:
    """Refuse options that mean nothing without another, rather than silently ignore them."""
    from .io import output_key

    for flag, value in (("--save-probabilities", args.probabilities_dir), ("--preview", args.preview)):
        if value and args.scheduler == "dask":
            raise UsageError(f"{flag} is not supported with --scheduler dask")
    if args.probability_dtype and not args.probabilities_dir:
        raise UsageError("--probability-dtype needs --save-probabilities")
    for flag, value in (("--address", args.address), ("--workers", args.workers)):
        if value is not None and args.scheduler != "dask":
            raise UsageError(f"{flag} needs --scheduler dask")
    if args.address is not None and args.workers is not None:
        raise UsageError("--workers sets up a local cluster; with --address the cluster's own workers run")
    # check_targets refuses it too, later; here it is a usage error, before the weights load.
    if args.probabilities_dir and output_key(args.probabilities_dir) == output_key(args.output):
        raise UsageError("--save-probabilities must name another folder than -o: each map would replace its mask")


def run_predict(args) -> int:
    """``lsmseg predict``: segment every input volume into ``args.output``.

    Returns:
        :data:`EXIT_OK`, or :data:`EXIT_FAILED` when any input is missing or any volume failed.

    Raises:
        UsageError: options that do not go together, or a value the core refused (e.g. an engine
            the device cannot run).
    """
    from .inference import Predictor, RunOptions, predict_files
    from .io import expand_inputs

    _check_combinations(args)
    # A typo in a path fails now, not after the weights are loaded; the other inputs still run.
    missing = [path for path in args.inputs if not path.exists()]
    for path in missing:
        logger.error("%s", one_line(path, "no such file or folder"))
    if missing and len(missing) == len(args.inputs):
        return EXIT_FAILED
    try:  # a ValueError here is a setting the core refused, not a failure while processing
        options = RunOptions(
            structure=args.structure, block_size=args.block_size, skip_background=args.skip_background,
            window_cache_mb=args.window_cache_mb,
            resample=args.resample, mask_value=args.mask_value, max_voxels=args.max_voxels,
            probabilities_dir=args.probabilities_dir,
            probability_dtype=args.probability_dtype or RunOptions.probability_dtype, preview=args.preview,
            progress=argtypes.progress_wanted(args.quiet),
        )
        predictor = Predictor.from_manifest(
            args.weights, device=args.device, precision=args.precision, engine=args.engine, compile=args.compile,
            options=options, threshold=args.threshold, min_component_voxels=args.min_component_voxels,
            intensity_floor=args.intensity_floor, input_scale=args.input_scale, overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            mirror_axes=args.mirror_axes,
        )
    except ValueError as exc:
        raise UsageError(single_line(exc)) from None
    map_large_buffers_for(predictor)  # memory freed between blocks goes back to the system
    inputs = expand_inputs([path for path in args.inputs if path not in missing])
    if not inputs:
        logger.warning("no volumes found in %s", ", ".join(map(str, args.inputs)))
        return EXIT_FAILED if missing else EXIT_OK
    if args.part:
        total = len(inputs)
        inputs = select_part(inputs, args.part)
        logger.info("part %d/%d: %d of %d volume(s)", *args.part, len(inputs), total)
        if not inputs:
            return EXIT_OK
    if args.scheduler == "dask":
        from .distributed import predict_files_dask

        results = predict_files_dask(predictor, inputs, args.output, args.output_format, args.address, args.workers,
                                     input_folders=args.inputs)
    else:
        # The folder arguments too: no output inside one, no link out of one.
        results = predict_files(predictor, inputs, args.output, output_format=args.output_format,
                                input_folders=args.inputs)
    failed = [r for r in results if not r.ok]
    logger.info("%d of %d volume(s) segmented into %s", len(results) - len(failed), len(results), args.output)
    unrecorded = any(r.provenance_error for r in results)  # mask written, its record not (ERROR logged)
    return EXIT_FAILED if failed or unrecorded or missing else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``lsmseg`` parser: ``predict``, ``challenge``/``serve`` and the installed plug-in commands."""
    parser = argparse.ArgumentParser(
        prog="lsmseg",
        description="Semantic segmentation of 3-D light-sheet microscopy volumes (Swin UNETR).",
    )
    parser.add_argument("--version", action="version", version=f"lsmseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict_command(subparsers)
    add_challenge_commands(subparsers)
    for plugin in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = plugin.load()
        except ImportError:
            continue  # its package is not installed (e.g. training in the inference image)
        register(subparsers)
    # Let -v/-q also follow the command (`lsmseg predict ... -q`), for every command alike.
    for subparser in subparsers.choices.values():
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        subparser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="warnings and errors only, no progress bars")
    return parser


class _LevelPrefixFormatter(logging.Formatter):
    """Plain messages for progress; ``ERROR: ...`` / ``WARNING: ...`` for what needs attention."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


class _AboveProgressBars(logging.StreamHandler):
    """Each log line printed above the progress bars (``tqdm.write`` clears them, prints, redraws),
    not glued to the end of one: on a terminal an error was split across the bar's line and the next."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's own rule: a failed log line never stops the program
            self.handleError(record)


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr: INFO (DEBUG with ``verbose``, WARNING with ``quiet``), warnings and errors prefixed
    with their level, above any progress bar; third-party loggers at WARNING unless ``verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _AboveProgressBars(sys.stderr)
    handler.setFormatter(_LevelPrefixFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (MONAI, distributed) stays at warnings unless debugging.
    for noisy in ("monai", "distributed", "asyncio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run ``lsmseg`` with ``argv`` (default: ``sys.argv[1:]``) and return its exit code: 0 done, 1 any
    failure, 2 bad arguments (argparse exits with it itself), 130 on Ctrl-C; errors are one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(args.verbose, args.quiet)
    fit_threads_to_cpus()  # a container's --cpus: the host's core count would oversubscribe it
    try:
        return args.func(args)
    except UsageError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    except LsmsegError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
