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
from typing import Callable

from . import __version__
from .challenge.runner import add_challenge_commands
from .config import parse_mirror_axes
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, LsmsegError
from .inference.blocks import DEFAULT_WINDOW_CACHE_BYTES
from .inference.engines import ENGINES

logger = logging.getLogger("lsmseg")

COMMANDS_GROUP = "lsmseg.commands"


def zyx(kind: type = int) -> Callable[[str], tuple]:
    """An argparse type: three positive numbers ``Z,Y,X`` (or ``ZxYxX``) of ``kind``."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected Z,Y,X {kind.__name__} values, got {text!r}") from None
        if len(values) != 3 or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected three positive numbers Z,Y,X, got {text!r}")
        return values

    return parse


def _block_size(text: str) -> int | tuple[int, int, int]:
    if text.strip().isdigit():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"block size must be positive, got {text}")
        return value
    return zyx(int)(text)


def _part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 2/4, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= K <= N, got {text!r}")
    return k, n


def select_part(items: list, part: tuple[int, int] | None) -> list:
    """The K-th of N interleaved shares (1-based): every N-th item from the K-th."""
    if part is None:
        return list(items)
    k, n = part
    return list(items)[k - 1 :: n]


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in (0, 1), got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite value >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def add_predict_command(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment volumes with trained weights",
        description="Segment 3-D volumes. Each INPUT is a volume (TIFF stack, NIfTI, MHA/NRRD, zarr, a folder "
        "of 2-D TIFF planes) or a folder of volumes. Masks are written to OUT with the same name and "
        "format as their input, plus a provenance JSON beside each.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="volume files or folders")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument("--weights", type=Path, metavar="MANIFEST",
                   help="weights: a manifest, a folder holding one, or a model tarball (default: LSMSEG_WEIGHTS, "
                   "a model at /opt/ml/model, then the installed weights)")
    p.add_argument("--structure", help="structure to segment (default: the manifest's general model)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    p.add_argument("--threshold", type=_probability, help="probability threshold (default: the manifest's)")
    p.add_argument("--min-component-voxels", type=int, metavar="N",
                   help="remove connected components smaller than N voxels (default: the manifest's; 0 keeps all)")
    p.add_argument("--intensity-floor", type=_non_negative, metavar="X",
                   help="never mark voxels whose normalised intensity is below X (1 = the volume's 99.5th percentile, "
                   "1 + ln x above it; default: the manifest's, per structure; 0 turns it off)")
    p.add_argument("--overlap", type=float, help="window overlap as a fraction in [0, 1) (default: the manifest's)")
    p.add_argument("--batch-size", type=int, dest="sw_batch_size", help="windows per forward pass")
    p.add_argument("--mirror-axes", type=parse_mirror_axes, metavar="none|all|ZYX",
                   help="test-time mirroring: also run every window flipped along each combination of these axes "
                   "and average (all: 8 passes per window; default: the manifest's, per structure)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: fp16/bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="do not resample inputs whose voxel spacing differs from the model's")
    p.add_argument("--mask-value", type=int, choices=[1, 255], default=1,
                   help="foreground value in the masks (255 is easier to see in viewers)")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse inputs whose headers declare more voxels, before reading them "
                   "(default: env LSMSEG_MAX_VOXELS, else 2^33 = 8.6e9)")
    p.add_argument("--save-probabilities", type=Path, metavar="DIR", dest="probabilities_dir",
                   help="also write each volume's foreground probability to DIR, same name and format as its mask")
    p.add_argument("--probability-dtype", choices=["uint8", "float16"], default="uint8",
                   help="uint8: p = value/255 (default); float16 (float32 in NIfTI/MHA/NRRD)")
    scale = p.add_argument_group("large volumes and throughput")
    scale.add_argument("--output-format", choices=["same", "zarr"], default="same",
                       help="same: the input's container (TIFF written plane by plane); zarr: OME-Zarr <name>.ome.zarr")
    scale.add_argument("--block-size", type=_block_size, metavar="N|Z,Y,X",
                       help="output block edge in voxels; memory follows it, not the volume (default: blocks of at most 256^3 voxels, as few as possible)")
    scale.add_argument("--window-cache-mb", type=_non_negative_int, metavar="MB", default=DEFAULT_WINDOW_CACHE_BYTES >> 20,
                       help="memory for keeping the outputs of windows on block borders for the next blocks, so "
                            "that each window runs once (default: %(default)s; 0: they run once per block they touch)")
    scale.add_argument("--no-skip-background", dest="skip_background", action="store_false",
                       help="run the network on uniformly dark windows too (default: skip them)")
    scale.add_argument("--compile", action="store_true", help="torch.compile the model (slow start; off by default)")
    scale.add_argument("--engine", choices=ENGINES, default="auto",
                       help="network runtime; auto: on CPU OpenVINO (lsmseg[openvino]), else ONNX Runtime "
                            "(lsmseg[onnx]), when installed, else PyTorch")
    scale.add_argument("--scheduler", choices=["local", "dask"], default="local",
                       help="dask: spread each volume's blocks over dask.distributed workers")
    scale.add_argument("--address", metavar="tcp://HOST:PORT",
                       help="dask scheduler to use (default: a LocalCluster, one worker per GPU)")
    scale.add_argument("--workers", type=int, metavar="N", help="LocalCluster workers (default: one per GPU, or 1)")
    scale.add_argument("--part", type=_part, metavar="K/N",
                       help="process only the K-th of N interleaved shares of the input volumes (1-based), "
                       "for running N independent jobs")
    p.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from .inference import Predictor, RunOptions, predict_files
    from .io import expand_inputs

    if args.probabilities_dir and args.scheduler == "dask":
        logger.error("--save-probabilities is not supported with --scheduler dask")
        return EXIT_USAGE
    # A typo in a path fails now, not after the weights are loaded; the other inputs still run.
    missing = [path for path in args.inputs if not path.exists()]
    for path in missing:
        logger.error("%s: no such file or folder", path)
    if missing and len(missing) == len(args.inputs):
        return EXIT_FAILED
    options = RunOptions(
        structure=args.structure, block_size=args.block_size, skip_background=args.skip_background,
        window_cache_mb=args.window_cache_mb,
        resample=args.resample, mask_value=args.mask_value, max_voxels=args.max_voxels,
        probabilities_dir=args.probabilities_dir, probability_dtype=args.probability_dtype, progress=not args.quiet,
    )
    predictor = Predictor.from_manifest(
        args.weights, device=args.device, precision=args.precision, engine=args.engine, compile=args.compile,
        options=options, threshold=args.threshold, min_component_voxels=args.min_component_voxels,
        intensity_floor=args.intensity_floor, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        mirror_axes=args.mirror_axes,
    )
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

        results = predict_files_dask(predictor, inputs, args.output, args.output_format, args.address, args.workers)
    else:
        results = predict_files(predictor, inputs, args.output, output_format=args.output_format)
    failed = [r for r in results if not r.ok]
    logger.info("%d of %d volume(s) segmented into %s", len(results) - len(failed), len(results), args.output)
    unrecorded = any(r.provenance_error for r in results)  # mask written, its record not (ERROR logged)
    return EXIT_FAILED if failed or unrecorded or missing else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
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


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefixFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (MONAI, distributed) stays at warnings unless debugging.
    for noisy in ("monai", "distributed", "asyncio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except LsmsegError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
