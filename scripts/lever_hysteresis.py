"""Lever measurement (2026-11-28, not kept): hysteresis thresholding on the validation split.

Objects are seeded where the probability reaches ``threshold`` and grown into the 26-connected
voxels at or above a lower ``grow`` threshold (26-connected components labelled by SimpleITK, as
lsmseg's clean-up does), then touching objects split and small components removed as lsmseg does.
The aim was to give c-Fos and microglia objects found at their high thresholds their fuller extent
(Dice, and PQ's matched IoU) and to reconnect vessels broken at 0.5 (clDice). Result and reading:
training/README.md, lever table; grids: benchmarks/results/hysteresis_validation_2026-11-28.json.

    python scripts/lever_hysteresis.py predict weights/manifest.yaml /tmp/hyst   # one-pass logits, fp16
    python scripts/lever_hysteresis.py score /tmp/hyst cfos_neuron out.json       # the grid, one structure

Needs the real data ($LSMSEG_DATA) and the shipped run's config (its validation split). One pass
per window (no mirroring), as every lever row of the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from lsmseg.inference.predictor import logit

CONFIG = Path("training/configs/general_finetune_real_logtail.yaml")
HIGH = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97)
GROW = (None, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9)  # None: plain thresholding


def predict(manifest: Path, out: Path) -> None:
    import torch

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.io import read_volume
    from lsmseg_training.config import FinetuneConfig, load_run_config
    from lsmseg_training.data import dense_label
    from lsmseg_training.tune import validation_volumes

    torch.set_num_threads(1)  # it ran beside two training runs
    config = load_run_config(FinetuneConfig, CONFIG)
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    predictor.settings = dataclasses.replace(predictor.settings, per_structure={}, mirror_axes=())
    out.mkdir(parents=True, exist_ok=True)
    for volume in validation_volumes(config):
        start = time.time()
        logits = predictor.predict_logits(read_volume(volume["image"]).load(), volume["spacing"], name=volume["name"])
        np.savez_compressed(out / f"{volume['structure']}__{volume['name']}.npz", logits=logits.astype(np.float16),
                            truth=dense_label(volume["label"], volume["label_values"]))
        print(volume["name"], volume["structure"], logits.shape, round(time.time() - start, 1), flush=True)


def grow(logits: np.ndarray, high: float, low: float) -> np.ndarray:
    """The 26-connected components of ``logits >= logit(low)`` that hold a voxel ``>= logit(high)``."""
    import SimpleITK as sitk

    low_mask = (logits >= logit(low)).astype(np.uint8)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(low_mask), True))
    keep = np.zeros(labels.max() + 1, bool)
    keep[np.unique(labels[logits >= logit(high)])] = True
    keep[0] = False
    return keep[labels].astype(np.uint8)


def score(folder: Path, structure: str, out: Path) -> None:
    from lsmseg.inference.postprocess import remove_small_components, split_touching
    from lsmseg_training.tune import leaderboard_score

    volumes = [np.load(f) for f in sorted(folder.glob(f"{structure}__*.npz"))]
    volumes = [(v["logits"].astype(np.float32), v["truth"]) for v in volumes]
    splits = (0.0, 1.0) if structure == "microglia" else (0.0,)  # the shipped choices: split only microglia
    rows = []
    for high, low, split, min_voxels in itertools.product(HIGH, GROW, splits, (10, 100)):
        if low is not None and low >= high:
            continue
        scores = []
        for logits, truth in volumes:
            mask = (logits >= logit(high)).astype(np.uint8) if low is None else grow(logits, high, low)
            scores.append(leaderboard_score(structure, remove_small_components(split_touching(mask, split), min_voxels),
                                            truth))
        row = {"threshold": high, "grow": low, "split": split, "min": min_voxels}
        row.update({k: round(float(np.nanmean([s[k] for s in scores])), 4) for k in scores[0]})
        rows.append(row)
        print(structure, row, flush=True)
    best = max(rows, key=lambda r: r["score"])
    plain = max((r for r in rows if r["grow"] is None), key=lambda r: r["score"])
    print("BEST", structure, best, "\nBEST PLAIN", plain, flush=True)
    out.write_text(json.dumps({structure: rows}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["predict"] and len(sys.argv) == 4:
        predict(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["score"] and len(sys.argv) == 5:
        score(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__.split("\n\n")[2])
