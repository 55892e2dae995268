"""Tables for training/README.md, from measurements only.

    python -m lsmseg_training.compare --weights weights \
        --images "${LSMSEG_DATA:-../shared/data/real}/vesselnn/images" --labels "${LSMSEG_DATA:-../shared/data/real}/vesselnn/labels" \
        --names poon2015_BBB_Leakage santos2015_mixedSizelowContrastVessels \
        --runs runs/general/finetune runs/general/finetune_scratch

1. The exported weights, applied exactly as ``lsmseg predict`` applies them (Predictor.from_manifest,
   the manifest's threshold), against a smoothed-Otsu baseline (Gaussian sigma 1 voxel, Otsu's
   threshold on the smoothed volume) on the named labelled volumes; Dice with MONAI's DiceMetric.
2. For each fine-tuning run: its best and final checkpoints re-scored on the same volumes with the
   current predictor (overlap 0.5), at threshold 0.5 and at the threshold tuned on these volumes,
   every run on one sweep (``--thresholds``, else the union of the runs' own sweeps).

A warning names every setting the runs differ in besides name and output, and every scored volume a
run (or the weights) trained on: such a table compares more than its header says.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from .finetune import describe_start

logger = logging.getLogger(__name__)


def smoothed_otsu(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    smooth = gaussian_filter(image.astype(np.float32), sigma)
    return smooth > threshold_otsu(smooth)


def read_label(labels: Path, image_path: Path) -> np.ndarray:
    """The label of ``image_path`` (same file name in ``labels``) as a foreground mask, read as
    ``lsmseg evaluate`` reads a binary label: 0 and one other value; a sparse (TRAILMAP) or
    multi-valued label is refused, never scored with its every labelled voxel as foreground."""
    from lsmseg.errors import InputError
    from lsmseg.io import read_volume
    from lsmseg_evaluation.labels import distinct_values, label_masks

    path = Path(labels) / image_path.name
    array = read_volume(path).load()
    if len([v for v in distinct_values(array) if v != 0]) > 1:  # evaluate's own message names its options
        raise InputError(path, "compare scores binary labels only (0 and one other value); score a sparse "
                         "(TRAILMAP) label with lsmseg evaluate --label-scheme sparse")
    return label_masks(array, path)[0]


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    from .finetune import dice_scores

    return dice_scores(prediction.astype(np.float32), label, [0.5])[0]


def image_path_of(images: Path, name: str) -> Path:
    """The volume ``name`` (as :func:`lsmseg.io.volume_name` names it, so ``a`` is ``a.nii.gz`` but not
    ``a.backup.tif``, and ``.mhd`` headers' data files are not volumes) in the folder ``images``;
    refused in one line when missing."""
    from lsmseg.io import list_volumes, volume_name

    images = Path(images)
    if not images.is_dir():
        raise SystemExit(f"ERROR: {images}: not a folder of images")
    found = [p for p in list_volumes(images) if volume_name(p) == name]
    if not found:
        raise SystemExit(f"ERROR: {images}: no volume named {name!r}")
    return found[0]


def read_run_record(run: Path) -> dict:
    """A fine-tuning run's ``run.json``; refused in one line when missing or not JSON."""
    path = Path(run) / "run.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"ERROR: {run}: no run.json (not a fine-tuning run's output folder?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"ERROR: {path}: cannot be read as JSON ({exc})") from None
    missing = [key for key in ("config", "best", "final") if not isinstance(record, dict) or key not in record]
    if missing:  # a run killed before it ended has no final checkpoint yet
        raise SystemExit(f"ERROR: {path}: names no {' or '.join(missing)} (an unfinished run? resume it first)")
    return record


def trained_on(fingerprint: dict | None, names: list[str]) -> list[str]:
    """The ``names`` among the training volumes of a data fingerprint (run.json's ``data``)."""
    trained = {volume.get("name") for volume in (fingerprint or {}).get("volumes", [])}
    return [name for name in names if name in trained]


def settings_differing(records: list[dict]) -> list[str]:
    """Dotted config keys whose values differ between the runs, besides name and output."""
    from .engine import flat_settings

    flat = [flat_settings(record["config"]) for record in records]
    keys = sorted(set().union(*flat) - {"name", "output"})
    return [key for key in keys if len({json.dumps(f.get(key), sort_keys=True) for f in flat}) > 1]


def common_sweep(records: list[dict]) -> list[float]:
    """One threshold sweep for every run (the union of theirs), so that their tuned columns are alike."""
    return sorted({float(t) for record in records
                   for t in ((record["config"] or {}).get("validation") or {}).get("thresholds") or []})


def weights_vs_otsu(weights: Path, images: Path, labels: Path, names: list[str],
                    structure: str | None = None) -> list[dict]:
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.io import read_volume

    # ``structure``: its post-processing for every volume, as `lsmseg predict --structure` applies it.
    predictor = Predictor.from_manifest(weights, device="cpu", options=RunOptions(progress=False, structure=structure))
    rows = []
    for name in names:
        image_path = image_path_of(images, name)
        volume = read_volume(image_path)
        label = read_label(labels, image_path)
        image = volume.load()
        mask = predictor.predict_volume(image, volume.spacing, name=name)
        # The threshold this volume was cut at: its structure's, where its name carries one.
        rows.append({"volume": name, "model": dice(mask, label), "otsu": dice(smoothed_otsu(image), label),
                     "threshold": predictor.settings_for(name).threshold})
    return rows


def evaluate_run(run: Path, images: Path, labels: Path, names: list[str], thresholds: list[float] | None = None) -> list[dict]:
    """Re-score a fine-tuning run's best and final checkpoints on the named volumes, now, with the
    current predictor (so that runs made with different code versions are compared alike)."""
    from lsmseg.config import ModelConfig, from_dict
    from lsmseg.model import build_model
    from lsmseg.weights import load_state_dict

    from .config import FinetuneConfig
    from .finetune import EXPORT_OVERLAP, validate

    record = read_run_record(run)
    config = from_dict(FinetuneConfig, record["config"], f"{run}/run.json:config")
    if thresholds:
        config.validation.thresholds = sorted(set(thresholds) | {0.5})  # the table's "at 0.5" column needs 0.5
        # validate() also sweeps the run's own threshold: set to 0.5, every run's sweep is the one given.
        config.validation.threshold = 0.5
    volumes = []
    for name in names:
        from lsmseg.io import read_volume

        image_path = image_path_of(images, name)
        volume = read_volume(image_path)
        volumes.append({"name": name, "image": volume.load(), "spacing": volume.spacing,
                        "label": read_label(labels, image_path)})
    rows = []
    for which in ("best", "final"):
        if which == "final" and record["final"]["sha256"] == record["best"]["sha256"]:
            rows[-1]["checkpoint"] = f"best = final (step {record['final']['step']})"
            continue
        model = build_model(from_dict(ModelConfig, record["config"]["model"], "model"))
        model.load_state_dict(load_state_dict(Path(run) / record[which]["file"], record[which]["sha256"]))
        result = validate(model, config, volumes, torch_device(), EXPORT_OVERLAP)
        thresholds = result["thresholds"]
        tuned = thresholds.index(result["best_threshold"])
        half = thresholds.index(0.5)
        rows.append({
            "run": record["name"],
            "init": describe_start(record.get("init"), record.get("pretrained")),
            "checkpoint": f"{which} (step {record[which]['step']})",
            "steps": record.get("steps"),
            "threshold": result["best_threshold"],
            "tuned": result["best_dice"],
            "at_0.5": result["mean_dice"][half],
            "per_volume_tuned": {n: v[tuned] for n, v in result["per_volume"].items()},
            "per_volume_0.5": {n: v[half] for n, v in result["per_volume"].items()},
        })
    return rows


def torch_device():
    import torch

    return torch.device("cpu")


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 a missing or unreadable volume, run folder or weights, 2 bad arguments."""
    from lsmseg import argtypes
    from lsmseg.errors import LsmsegError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder or manifest to compare with smoothed Otsu")
    parser.add_argument("--structure", type=argtypes.structure,
                        help="with --weights: apply this structure's settings to every volume, as `lsmseg predict "
                        "--structure` does (default: each name's structure prefix, else the manifest's defaults)")
    parser.add_argument("--images", type=Path, help="folder of the labelled volumes")
    parser.add_argument("--labels", type=Path, help="folder of their labels (same file names)")
    parser.add_argument("--names", nargs="*", default=[], help="volumes to score (file names without extension)")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="fine-tuning output folders (run.json)")
    parser.add_argument("--thresholds", nargs="*", type=float, help="threshold sweep for --runs (default: the run's; 0.5 is always added)")
    args = parser.parse_args(argv)
    if not (args.weights or args.runs):
        parser.error("nothing to compare: give --weights and/or --runs")
    missing = [option for option, value in (("--images", args.images), ("--labels", args.labels),
                                            ("--names", args.names)) if not value]
    if missing:
        parser.error(f"--weights and --runs score named volumes: give {', '.join(missing)}")
    logging.basicConfig(level=logging.WARNING)
    try:
        return _compare(args)
    except LsmsegError as exc:  # a volume, label or checkpoint that cannot be read: one line, not a traceback
        raise SystemExit(f"ERROR: {exc}") from None


def _compare(args) -> int:
    # Every named volume and run record first: a typo is refused before minutes of prediction.
    for name in args.names:
        image_path_of(args.images, name)
    records = {run: read_run_record(run) for run in args.runs}
    warn_unlike(args, records)
    thresholds = args.thresholds or (common_sweep(list(records.values())) if len(records) > 1 else None)
    if args.weights:
        rows = weights_vs_otsu(args.weights, args.images, args.labels, args.names, args.structure)
        print("| volume | exported model | smoothed Otsu |\n|---|---|---|")
        for row in rows:
            print(f"| {row['volume']} | {row['model']:.3f} | {row['otsu']:.3f} |")
        print(f"| **mean** | **{np.mean([r['model'] for r in rows]):.3f}** | **{np.mean([r['otsu'] for r in rows]):.3f}** |")
        used = sorted({row["threshold"] for row in rows})
        print(f"\n(model threshold{'s' if len(used) > 1 else ''} {', '.join(f'{t:g}' for t in used)} from the manifest)\n")
    if args.runs:
        print("| run | initialisation | checkpoint | " + " | ".join(f"{n} (thr. 0.5)" for n in args.names)
              + " | mean Dice, thr. 0.5 | mean Dice, tuned thr. (thr.) |")
        print("|---" * (5 + len(args.names)) + "|")
        for run in args.runs:
            for row in evaluate_run(run, args.images, args.labels, args.names, thresholds):
                cells = " | ".join(f"{row['per_volume_0.5'][n]:.3f}" for n in args.names)
                print(f"| {row['run']} | {row['init']} | {row['checkpoint']} | {cells} | {row['at_0.5']:.3f} | "
                      f"{row['tuned']:.3f} ({row['threshold']}) |")
    return 0


def warn_unlike(args, records: dict) -> None:
    """Warn, one line each, where the table would compare more than its header says."""
    from lsmseg.weights import load_manifest, resolve_manifest

    sources = {str(run): record.get("data") for run, record in records.items()}
    if args.weights:
        # The model --structure picks, as Predictor.from_manifest does.
        _, entry = load_manifest(resolve_manifest(args.weights)).entry_for(args.structure)
        sources[str(args.weights)] = entry.provenance.get("training_data")
    for source, fingerprint in sources.items():
        seen = trained_on(fingerprint, args.names)
        if seen:
            logger.warning("%s trained on %s: its scores there are not held-out", source, ", ".join(seen))
    differing = settings_differing(list(records.values())) if len(records) > 1 else []
    if differing:
        logger.warning("the runs differ in %s besides name and output", ", ".join(differing))


if __name__ == "__main__":
    raise SystemExit(main())
