"""``lsmseg pretrain``, ``lsmseg finetune`` and ``lsmseg export`` (registered through the
``lsmseg.commands`` entry point)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from pathlib import Path

from lsmseg import argtypes
from lsmseg.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED

logger = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    stages = [
        ("pretrain", run_pretrain, "masked self-supervised pretraining of the Swin UNETR encoder",
         "Masked self-supervised pretraining on unlabelled volumes (training/README.md). "
         "Runs under torchrun for several processes (NCCL on GPUs, gloo on CPUs)."),
        ("finetune", run_finetune, "fine-tune on labelled volumes from a pretrained encoder",
         "Fine-tune a Swin UNETR on labelled volumes with periodic sliding-window validation; keeps "
         "the best and the final checkpoint and tunes the threshold (training/README.md)."),
    ]
    for name, func, summary, description in stages:
        p = subparsers.add_parser(name, help=summary, description=description)
        p.add_argument("-c", "--config", type=Path, required=True, help="YAML config (training/configs/)")
        p.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT/checkpoint_last.pt if present (without it, a folder that holds a "
                       "run is refused); only run-control settings (epochs, max_seconds, threads, ...) may change")
        p.add_argument("--data", type=Path, metavar="DIR",
                       help="real-data folder that $LSMSEG_DATA in the config means (default: the LSMSEG_DATA "
                       "environment variable, else ../shared/data/real beside the checkout)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="replace a config setting (dotted key, YAML value; repeatable), e.g. "
                       "--set max_seconds=300 --set model.roi=[64,64,64]; the run record keeps the result")
        p.set_defaults(func=func)

    p = subparsers.add_parser(
        "export",
        help="write a fine-tuned checkpoint to a weights folder with its manifest entry",
        description="Copy the best (or final) checkpoint of a fine-tuning run into a weights folder as "
        "NAME.safetensors and add its entry (sha256, model config, inference settings with the tuned "
        "threshold, validation metrics, training config, data fingerprint, versions) to manifest.yaml. "
        "An existing entry or file of that name is replaced only with --force.",
    )
    p.add_argument("run", type=Path, help="output folder of a finished `lsmseg finetune` run")
    p.add_argument("-o", "--weights-dir", type=Path, metavar="DIR",
                   help="weights folder (default: RUN/export); use with `lsmseg predict --weights DIR`")
    p.add_argument("--name", type=model_name, default="general",
                   help="model name in the manifest and of NAME.safetensors: letters, digits, . _ - (default: general)")
    p.add_argument("--force", action="store_true", help="replace an existing entry or file named NAME")
    p.add_argument("--checkpoint", choices=["best", "final"], default="best", help="which checkpoint (default: best)")
    p.add_argument("--structures", nargs="*", type=argtypes.structure, help="structures it segments (default: the run config's)")
    p.add_argument("--default", dest="make_default", action="store_true",
                   help="make it the manifest's default model")
    p.add_argument("--threshold", type=argtypes.probability, help="override the tuned threshold (in (0, 1))")
    p.add_argument("--min-component-voxels", type=argtypes.non_negative_int, metavar="N",
                   help="inference removes connected components smaller than N voxels "
                   "(default: the shipped weights' value; 0 keeps all)")
    p.set_defaults(func=run_export)


def model_name(text: str) -> str:
    """An argparse type: a model name that is also a plain file name (:func:`lsmseg_training.export.check_name`)."""
    from .export import check_name

    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM during training, raised like Ctrl-C so that every ``finally`` runs (temporary files, processes)."""


@contextlib.contextmanager
def _terminated_as_exception():
    def terminate(signum, frame):
        raise Terminated()

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _train(run) -> int:
    """``run()`` a training stage. Ctrl-C (exit 130) or SIGTERM (exit 143) stop it between writes: the
    checkpoint of the last ``checkpoint_every`` step stays, written atomically, and ``--resume`` continues it."""
    try:
        with _terminated_as_exception():
            run()
    except Terminated:
        logger.error("terminated; continue the run from its last checkpoint with --resume")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        logger.error("interrupted; continue the run from its last checkpoint with --resume")
        return EXIT_INTERRUPTED
    return EXIT_OK


def run_pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, load_run_config
    from .pretrain import run_pretraining

    config = load_run_config(PretrainConfig, args.config, args.data, args.overrides)
    return _train(lambda: run_pretraining(config, args.config, resume=args.resume))


def run_finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig, load_run_config
    from .finetune import run_finetuning

    config = load_run_config(FinetuneConfig, args.config, args.data, args.overrides)
    return _train(lambda: run_finetuning(config, args.config, resume=args.resume))


def run_export(args: argparse.Namespace) -> int:
    from .export import export_run

    manifest = export_run(args.run, args.weights_dir, name=args.name, checkpoint=args.checkpoint,
                          structures=args.structures, make_default=args.make_default or None,
                          threshold=args.threshold, min_component_voxels=args.min_component_voxels,
                          force=args.force)
    print(manifest)
    return EXIT_OK
