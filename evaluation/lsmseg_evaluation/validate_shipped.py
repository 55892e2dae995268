"""Validate weights on real labelled volumes: ``lsmseg predict``, then evaluate, then report.

    python -m lsmseg_evaluation.validate_shipped [--weights MANIFEST] [--out runs/validate-vesselnn]

Defaults: the installed (shipped) weights and ``<repo>/../shared/data/real/vesselnn`` (``images/``
and ``labels/`` with the same names). vesselNN TIFFs carry no voxel size, so the known one
(5 x 0.99 x 0.99 um, z, y, x) is written into staged copies of the images before prediction
(the predictor can then resample to the model's spacing, as it would for a well-labelled file)
and used for HD95 in micrometres. Writes the usual report plus ``results.md``, a Markdown table
for README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real" / "vesselnn"
VESSELNN_SPACING = (5.0, 0.99, 0.99)  # (z, y, x) um, from the dataset description


def build_parser() -> argparse.ArgumentParser:
    from .cli import spacing_argument

    parser = argparse.ArgumentParser(
        prog="python -m lsmseg_evaluation.validate_shipped",
        description="Predict a labelled data set with lsmseg weights, evaluate, and write the report.",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and labels/")
    parser.add_argument("--weights", type=Path, help="weights manifest (default: the installed weights)")
    parser.add_argument("--out", type=Path, default=Path("runs/validate-vesselnn"), help="report folder")
    parser.add_argument("--predictions", type=Path, help="keep the predicted masks here (default: a temporary folder)")
    parser.add_argument("--spacing", type=spacing_argument, default=VESSELNN_SPACING, metavar="Z,Y,X",
                        help="voxel size in um for images that do not record one (default: vesselNN's 5,0.99,0.99)")
    parser.add_argument("--structure", default="vessels", help="structure (weights choice and report grouping)")
    parser.add_argument("--device", help="torch device for prediction (default: cuda if available)")
    parser.add_argument("--threshold", help="probability threshold (default: the manifest's)")
    parser.add_argument("--title", help="report title")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def _stage_images(images: list[Path], spacing, folder: Path) -> list[Path]:
    """Inputs for ``lsmseg predict``: the originals, or copies that record ``spacing`` when they do not."""
    from lsmseg.io import read_volume, write_volume

    staged = []
    for path in images:
        try:
            volume = read_volume(path)
        except Exception:
            staged.append(path)  # let lsmseg predict report it, in its own words
            continue
        if volume.spacing is None and spacing is not None:
            target = folder / (volume.name + ".tif")
            write_volume(volume.load(), target, spacing=tuple(spacing))
            staged.append(target)
        else:
            staged.append(path)
    return staged


def held_out_names(weights, structure: str | None) -> set[str]:
    """Names of the volumes the weights were validated on (their manifest entry), i.e. not trained on."""
    from lsmseg.errors import LsmsegError
    from lsmseg.weights import find_manifest, load_manifest

    try:
        _, entry = load_manifest(find_manifest(weights)).entry_for(structure)
    except LsmsegError:  # no usable manifest: prediction reports that in its own words
        return set()
    return set(entry.validation.get("per_volume", {}))


def results_markdown(result, weights_note: str, held_out: set[str] = frozenset()) -> str:
    """A Markdown table of the per-volume scores and their mean, for README.md.

    With ``held_out`` (the weights' validation volumes), a column says which volumes the weights
    were trained on, and a second mean row covers the held-out ones only.
    """
    columns = [("dice", "Dice"), ("cldice", "clDice"), ("precision", "precision"), ("recall", "recall"),
               ("hd95_um", "HD95 (µm)"), ("betti0_error", "abs Δb0"), ("betti1_error", "abs Δb1")]

    def cell(value, key):
        if value is None:
            return "–"
        if isinstance(value, float) and value != value:
            return "undefined"
        if key.startswith("betti") or key == "hd95_um":
            return f"{value:.1f}" if isinstance(value, float) else str(value)
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    role = (lambda name: "held out" if name in held_out else "training") if held_out else None
    header = "| volume | " + ("role | " if role else "") + " | ".join(t for _, t in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1 + bool(role)) + "|"]
    for row in result.rows:
        prefix = f"| {row['name']} | " + (f"{role(row['name'])} | " if role else "")
        if row["status"] != "ok":
            lines.append(f"{prefix}failed: {row['error']} |")
            continue
        lines.append(prefix + " | ".join(cell(row[k], k) for k, _ in columns) + " |")
    metrics = result.summary["metrics"]
    means = [cell(metrics[k]["mean"], k) if k in metrics and metrics[k]["n"] else "–" for k, _ in columns]
    lines.append(f"| **mean (n={result.summary['n_scored']})** | " + ("all | " if role else "")
                 + " | ".join(f"**{m}**" for m in means) + " |")
    held = [row for row in result.rows if row["status"] == "ok" and role and role(row["name"]) == "held out"]
    if held:
        def mean(key):
            values = [row[key] for row in held if isinstance(row[key], (int, float)) and row[key] == row[key]]
            return cell(float(sum(values) / len(values)), key) if values else "–"

        lines.append(f"| **mean (n={len(held)})** | held out | " + " | ".join(f"**{mean(k)}**" for k, _ in columns) + " |")
    return "\n".join(lines) + f"\n\n{weights_note}\n"


def main(argv: list[str] | None = None) -> int:
    from lsmseg import cli as lsmseg_cli

    from .evaluate import EvaluationSettings, evaluate_folders, write_report, write_text_atomic

    args = build_parser().parse_args(argv)
    lsmseg_cli.configure_logging(quiet=args.quiet)
    images_dir, labels_dir = args.data / "images", args.data / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            logger.error("%s: folder not found (expected images/ and labels/ in %s)", folder, args.data)
            return 1
    from lsmseg.io import list_volumes

    with tempfile.TemporaryDirectory(prefix="lsmseg-validate-") as scratch:
        scratch = Path(scratch)
        staged_dir = scratch / "images"
        staged_dir.mkdir()
        predictions = args.predictions or scratch / "predictions"
        inputs = _stage_images(list_volumes(images_dir), args.spacing, staged_dir)
        predict_argv = ["--quiet"] if args.quiet else []
        predict_argv += ["predict", *map(str, inputs), "-o", str(predictions), "--structure", args.structure]
        for option, value in (("--weights", args.weights), ("--device", args.device), ("--threshold", args.threshold)):
            if value is not None:
                predict_argv += [option, str(value)]
        start = time.perf_counter()
        predict_status = lsmseg_cli.main(predict_argv)
        predict_seconds = time.perf_counter() - start
        lsmseg_cli.configure_logging(quiet=args.quiet)
        settings = EvaluationSettings(structure=args.structure, spacing=args.spacing, progress=not args.quiet)
        result = evaluate_folders(predictions, labels_dir, images_dir, settings)
        if args.predictions is None:
            result.summary["inputs"]["predictions"] = "temporary folder (removed; --predictions DIR keeps the masks)"
        provenance = sorted(Path(predictions).glob("*.provenance.json"))
        weights_note = _weights_note(provenance, predict_seconds)
        result.summary["weights"] = weights_note
        paths = write_report(result, args.out, title=args.title or f"lsmseg weights on {args.data.name}")
        markdown = results_markdown(result, weights_note, held_out_names(args.weights, args.structure))
        write_text_atomic(Path(args.out) / "results.md", markdown)
    print(markdown)
    logger.info("report: %s", paths["report"])
    return 1 if predict_status != 0 or result.failed else 0


def _weights_note(provenance_files: list[Path], seconds: float) -> str:
    import json

    if not provenance_files:
        return f"Prediction wrote no provenance ({seconds:.0f} s)."
    record = json.loads(provenance_files[0].read_text())
    weights = record.get("weights", {})
    device = record.get("parameters", {}).get("device", "?")
    return (f"Weights: {weights.get('file', '?')} (model '{weights.get('model', '?')}', sha256 "
            f"{str(weights.get('sha256', '?'))[:12]}…); prediction of {len(provenance_files)} volume(s) on {device} "
            f"took {seconds:.0f} s in total.")


if __name__ == "__main__":
    sys.exit(main())
