"""Lever measurement (2026-12-03): how bright DELiVR's labelled microglia are, brain by brain, and
what an intensity floor (``InferenceSettings.intensity_floor``) does to brains labelled each way.

    python scripts/lever_intensity_floor.py labels                    # the brightness of labels, per brain
    python scripts/lever_intensity_floor.py score weights out.json    # floors on the training brains

``labels``: per brain, the labelled fraction and where the labelled voxels sit in the network's
normalised intensity (the volume's own 0.5-99.5th percentile range, log tail): their 10th and 50th
percentiles, and the share of the voxels at least as bright as that 10th percentile that are
labelled. ``score``: the shipped weights' one-pass probabilities on two patches (0 and 2) of each
microglia training brain, scored with the leaderboard's Dice and PQ at thresholds 0.97 / 0.995 and
floors none / 0.5-2.5 (removal 30, as shipped). These brains were trained on, so their scores are
not accuracy figures: they show what a floor does under the other labelling. The floor's choice is
``lsmseg_training.tune``'s, on the validation split. Result and reading: training/README.md, lever
table. Needs the real data ($LSMSEG_DATA).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from lsmseg.realdata import real_data_root

TRAIN_BRAINS = ("2248", "3941", "5298", "6742")
FLOORS = (None, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5)
THRESHOLDS = (0.97, 0.995)


def labels() -> dict:
    from lsmseg.io import read_volume
    from lsmseg.normalise import normalise_volume

    folder = real_data_root() / "delivr" / "microglia"
    brains: dict[str, list] = {}
    for path in sorted((folder / "labels").glob("*.tif")):
        truth = read_volume(path).load() != 0
        if not truth.any():
            continue
        # The shipped weights' normalisation: 0.5-99.5th percentiles, log tail.
        normalised = normalise_volume(read_volume(folder / "images" / path.name).load(), upper_tail="log")
        p10, p50 = np.percentile(normalised[truth], [10, 50])
        bright = normalised >= p10
        brains.setdefault(path.stem.split("_")[1], []).append(
            (truth.mean(), p10, p50, truth[bright].mean()))
    table = {brain: dict(zip(("labelled_fraction", "label_p10", "label_p50", "labelled_share_of_as_bright"),
                             np.round(np.mean(rows, axis=0), 4).tolist()), patches_with_labels=len(rows))
             for brain, rows in brains.items()}
    for brain, row in table.items():
        print(brain, row)
    return table


def score(weights: Path, out: Path) -> None:
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.inference.postprocess import remove_small_components
    from lsmseg.inference.predictor import logit
    from lsmseg.io import read_volume
    from lsmseg_training.tune import leaderboard_score

    folder = real_data_root() / "delivr" / "microglia"
    predictor = Predictor.from_manifest(weights, options=RunOptions(progress=False))
    predictor.settings = dataclasses.replace(predictor.settings, per_structure={}, mirror_axes=())
    volumes = []
    for brain, k in itertools.product(TRAIN_BRAINS, (0, 2)):
        image = read_volume(folder / "images" / f"patchvolume_{brain}_{k}.tif").load()
        volumes.append((predictor.predict_logits(image, name=f"{brain}_{k}"), predictor.normalised(image),
                        read_volume(folder / "labels" / f"patchvolume_{brain}_{k}.tif").load() != 0))
    rows = []
    for threshold, floor in itertools.product(THRESHOLDS, FLOORS):
        scores = []
        for logits, normalised, truth in volumes:
            mask = logits >= logit(threshold)
            if floor is not None:
                mask &= normalised >= floor
            scores.append(leaderboard_score("microglia", remove_small_components(mask.astype(np.uint8), 30), truth))
        row = {"threshold": threshold, "intensity_floor": floor,
               **{key: round(float(np.nanmean([s[key] for s in scores])), 4) for key in scores[0]}}
        rows.append(row)
        print(row, flush=True)
    out.write_text(json.dumps({"labels": labels(), "training_brains": rows}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["labels"] and len(sys.argv) == 2:
        labels()
    elif sys.argv[1:2] == ["score"] and len(sys.argv) == 4:
        score(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__.split("\n\n")[1])
