"""Tables for training/README.md, from measurements only.

    python -m lsmseg_training.compare --weights weights \
        --images ../shared/data/real/vesselnn/images --labels ../shared/data/real/vesselnn/labels \
        --names poon2015_BBB_Leakage santos2015_mixedSizelowContrastVessels \
        --runs runs/general/finetune runs/general/finetune_scratch

1. The exported weights, applied exactly as ``lsmseg predict`` applies them (Predictor.from_manifest,
   the manifest's threshold), against a smoothed-Otsu baseline (Gaussian sigma 1 voxel, Otsu's
   threshold on the smoothed volume) on the named labelled volumes; Dice with MONAI's DiceMetric.
2. For each fine-tuning run: validation Dice of its best and final checkpoints (run.json).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def smoothed_otsu(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    smooth = gaussian_filter(image.astype(np.float32), sigma)
    return smooth > threshold_otsu(smooth)


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    from .finetune import dice_scores

    return dice_scores(prediction.astype(np.float32), label, [0.5])[0]


def weights_vs_otsu(weights: Path, images: Path, labels: Path, names: list[str]) -> list[dict]:
    from lsmseg.io import read_volume
    from lsmseg.predictor import Predictor

    predictor = Predictor.from_manifest(weights, device="cpu", progress=False)
    rows = []
    for name in names:
        image_path = next(p for p in Path(images).iterdir() if p.name.startswith(name + "."))
        volume = read_volume(image_path)
        label = read_volume(Path(labels) / image_path.name).load() != 0
        image = volume.load()
        mask = predictor.predict_volume(image, volume.spacing, name=name)
        rows.append({"volume": name, "model": dice(mask, label), "otsu": dice(smoothed_otsu(image), label),
                     "threshold": predictor.settings.threshold})
    return rows


def run_rows(run: Path, real: list[str]) -> list[dict]:
    record = json.loads((Path(run) / "run.json").read_text())
    rows = []
    for which in ("best", "final"):
        evaluation = record[which].get("evaluation")
        if not evaluation:
            continue
        thresholds = evaluation["thresholds"]
        at_half = thresholds.index(0.5) if 0.5 in thresholds else None
        tuned = thresholds.index(evaluation["best_threshold"])
        per_volume = evaluation["per_volume"]
        real_names = [n for n in per_volume if n in real]
        other = [n for n in per_volume if n not in real]
        rows.append({
            "run": record["name"],
            "init": "pretrained encoder" if record.get("pretrained") else "scratch",
            "checkpoint": f"{which} (step {record[which]['step']})",
            "steps": record.get("steps"),
            "threshold": evaluation["best_threshold"],
            "real_tuned": float(np.mean([per_volume[n][tuned] for n in real_names])) if real_names else None,
            "real_at_0.5": float(np.mean([per_volume[n][at_half] for n in real_names])) if real_names and at_half is not None else None,
            "phantoms_tuned": float(np.mean([per_volume[n][tuned] for n in other])) if other else None,
            "per_volume_tuned": {n: per_volume[n][tuned] for n in per_volume},
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder or manifest to compare with smoothed Otsu")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--names", nargs="*", default=[])
    parser.add_argument("--runs", nargs="*", type=Path, default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.weights:
        rows = weights_vs_otsu(args.weights, args.images, args.labels, args.names)
        print("| volume | exported model | smoothed Otsu |\n|---|---|---|")
        for row in rows:
            print(f"| {row['volume']} | {row['model']:.3f} | {row['otsu']:.3f} |")
        print(f"| **mean** | **{np.mean([r['model'] for r in rows]):.3f}** | **{np.mean([r['otsu'] for r in rows]):.3f}** |")
        print(f"\n(model threshold {rows[0]['threshold']} from the manifest)\n")
    if args.runs:
        print("| run | initialisation | checkpoint | real val Dice (tuned thr.) | real val Dice (thr. 0.5) | "
              "phantom val Dice (tuned) | tuned thr. |\n|---|---|---|---|---|---|---|")
        for run in args.runs:
            for row in run_rows(run, args.names):
                def fmt(v):
                    return "–" if v is None else f"{v:.3f}"
                print(f"| {row['run']} | {row['init']} | {row['checkpoint']} | {fmt(row['real_tuned'])} | "
                      f"{fmt(row['real_at_0.5'])} | {fmt(row['phantoms_tuned'])} | {row['threshold']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
