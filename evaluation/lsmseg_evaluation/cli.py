"""``lsmseg evaluate`` (registered through the ``lsmseg.commands`` entry point)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lsmseg.argtypes import progress_wanted
from lsmseg.cli import zyx
from lsmseg.errors import EXIT_FAILED, EXIT_OK

logger = logging.getLogger(__name__)


def jobs_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 process, got {value}")
    return value


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from .labels import LABEL_SCHEMES, SPARSE_EDGE_MODES
    from .leaderboard import DEFAULT_PRESET, PRESETS

    parser.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                        help="whose leaderboard metrics come first: selma3d-2026 (Dice + clDice for contiguous, "
                             "Dice + panoptica PQ for isolated structures) or selma3d-2024 (c-Fos: Dice, Betti-0 "
                             "error; microglia: + Betti-1 error, clDice). Default: %(default)s")
    parser.add_argument("--jobs", type=jobs_argument, default=1, metavar="N",
                        help="score N cases in parallel processes (default: 1)")

    parser.add_argument("--label-scheme", choices=LABEL_SCHEMES, default="binary",
                        help="binary: 0 and one foreground value (0/1, 0/255); nonzero: any non-zero is "
                             "foreground; sparse: 0 unlabelled, 1 background, 2 foreground (default: binary)")
    # No default here, so that a --sparse-edge without --label-scheme sparse can be refused.
    parser.add_argument("--sparse-edge", choices=SPARSE_EDGE_MODES,
                        help="with --label-scheme sparse: score TRAILMAP edge voxels (value 4) as background or "
                             f"ignore them (default: {SPARSE_EDGE_MODES[0]})")
    parser.add_argument("--spacing", type=zyx(float), metavar="Z,Y,X",
                        help="voxel size in um for every volume, overriding the files (HD95 and volumes in um)")
    parser.add_argument("--structure", help="structure of every volume not in --mapping: a SELMA3D 2026 structure or "
                                               "alias (e.g. vessels); another name is a usage error")
    parser.add_argument("--mapping", type=Path, metavar="FILE",
                        help="CSV (name,structure,category) or YAML mapping volume names to structure/category")
    parser.add_argument("--no-topology", dest="topology", action="store_false",
                        help="skip clDice, PQ and Betti numbers (faster on very large volumes)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="no per-volume figures")
    parser.add_argument("--title", default="lsmseg evaluation", help="report title")


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against labels and write a report",
        description="Pair predictions with labels by base name (any supported format), compute the SELMA3D "
        "leaderboard's own metrics (--preset) and ours (Dice, clDice, precision, recall, HD95, PQ, Betti-number "
        "errors) per case, and write metrics.csv, metrics.json (the organisers' results + aggregates), "
        "summary.json and report.html (with figures) to OUT. A case's structure comes from its name's "
        "SELMA3D prefix (blood_vessel_..., cfos_neuron_..., microglia_...; with --preset selma3d-2024, "
        "'cfos' or 'microglia' anywhere in it). Exit code 1 if any pair failed "
        "or any label had no prediction (scored as an empty prediction), and, with no report written, if "
        "a folder is missing or the label folder holds no volume; 2 for a bad option.",
    )
    parser.add_argument("--pred", type=Path, required=True, metavar="DIR", help="folder of predicted masks")
    parser.add_argument("--labels", type=Path, required=True, metavar="DIR", help="folder of label volumes")
    parser.add_argument("--images", type=Path, metavar="DIR", help="folder of images (for the figures)")
    parser.add_argument("--out", type=Path, default=Path("evaluation-report"), metavar="OUT",
                        help="report folder (default: evaluation-report)")
    add_evaluate_arguments(parser)
    parser.set_defaults(func=run_evaluate)


add_evaluate_command = add_commands  # the name the architecture brief uses


def settings_from_args(args):
    from lsmseg.cli import UsageError

    from .categories import load_mapping, unknown_structure
    from .labels import SPARSE_EDGE_MODES
    from .evaluate import EvaluationSettings

    if args.sparse_edge is not None and args.label_scheme != "sparse":
        raise UsageError("--sparse-edge needs --label-scheme sparse")
    # A typo would score every case as no structure (Dice only) and still exit 0.
    reason = unknown_structure(args.structure) if args.structure is not None else None
    if reason is not None:
        raise UsageError(f"--structure {reason}")
    try:  # as lsmseg predict decides: never with -q, else LSMSEG_PROGRESS, else only on a terminal
        progress = progress_wanted(getattr(args, "quiet", False))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return EvaluationSettings(
        label_scheme=args.label_scheme,
        sparse_edge=args.sparse_edge or SPARSE_EDGE_MODES[0],
        spacing=args.spacing,
        structure=args.structure,
        mapping=load_mapping(args.mapping) if args.mapping else {},
        mapping_source=str(args.mapping) if args.mapping else None,
        topology=args.topology,
        figures=args.figures,
        progress=progress,
        preset=args.preset,
        jobs=args.jobs,
    )


# The eval extra: import name -> pip name (pyproject.toml's [project.optional-dependencies] eval).
EVAL_MODULES = {
    "panoptica": "panoptica", "skimage": "scikit-image", "cc3d": "connected-components-3d", "matplotlib": "matplotlib",
}


def missing_eval_dependencies() -> list[str]:
    """pip names of the ``eval`` extra's packages that cannot be imported here."""
    import importlib.util

    return [pip for module, pip in EVAL_MODULES.items() if importlib.util.find_spec(module) is None]


def check_eval_dependencies() -> None:
    """Stop before any volume is read when the ``eval`` extra is missing, naming the fix."""
    from lsmseg.errors import LsmsegError

    missing = missing_eval_dependencies()
    if missing:
        raise LsmsegError(f"lsmseg evaluate needs the 'eval' extra (missing: {', '.join(missing)}): "
                          "pip install 'lsmseg[eval]', or from a clone: pip install -e '.[eval]'")


def check_report_folder(out: Path, *inputs: Path | None) -> None:
    """Refuse ``--out`` before any volume is scored when it is a file, or is or lies inside an input
    folder: the report must never overwrite inputs, and its figures/ folder would be read as a
    volume (a folder of planes) by the next run."""
    from lsmseg.errors import OutputError
    from lsmseg.io import refuse_overwriting_inputs

    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; choose a report folder")
    folders = [folder for folder in inputs if folder is not None]
    refuse_overwriting_inputs([(folder, out) for folder in folders], input_folders=folders)


def run_evaluate(args) -> int:
    check_eval_dependencies()
    from lsmseg.errors import printable

    from .evaluate import evaluate_folders, write_report

    settings = settings_from_args(args)  # usage errors first
    check_report_folder(args.out, args.pred, args.labels, args.images)
    result = evaluate_folders(args.pred, args.labels, args.images, settings)
    paths = write_report(result, args.out, title=args.title)
    print_summary(result)
    logger.info("report: %s", paths["report"])
    missing = result.summary["missing_predictions"]
    if missing:
        logger.error("%d label(s) had no prediction and were scored as empty predictions: %s",
                     len(missing), ", ".join(map(printable, missing)))
    for name in result.summary["leaderboard"]["unrouted"]:  # names are untrusted: one line each
        logger.warning("%s: name matches no %s rule; scored with Dice only", printable(name), args.preset)
    if result.failed:
        logger.error("%d of %d volume(s) could not be scored (see %s)", len(result.failed), len(result.rows), paths["metrics"])
    return EXIT_FAILED if result.failed or missing else EXIT_OK


def print_summary(result) -> None:
    metrics = result.summary["metrics"]
    parts = [f"{result.summary['n_scored']}/{result.summary['n_volumes']} scored"]
    board = result.summary.get("leaderboard")
    if board:
        values = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in board["aggregates"].items())
        logger.info("%s leaderboard aggregates: %s", board["preset"], values)
    for key, label in (("dice", "Dice"), ("cldice", "clDice"), ("hd95_um", "HD95 um"), ("hd95_voxels", "HD95 vox"),
                       ("betti0_error", "|db0|"), ("betti1_error", "|db1|")):
        stats = metrics.get(key)
        if stats and stats["n"]:
            parts.append(f"{label} {stats['mean']:.4f}")
    logger.info("%s", ", ".join(parts))
