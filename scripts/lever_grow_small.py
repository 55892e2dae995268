"""Lever measurement (2026-12-03, not kept): growing c-Fos's small components.

The shipped c-Fos settings (threshold 0.9, components under 10 voxels removed) miss objects whose
probability reaches 0.9 on a few voxels only: on validation brain 1147, 255 of 646 labelled cells
are missed (IoU < 0.3), 219 of them without any kept voxel on them, and in 6 of its 8 patches the
median missed cell peaks above 0.9 (0.91-0.95; 0.67 and 0.71 in the other two). The lever: keep components of ``min`` voxels or more, and grow those under
``small`` voxels ``iters`` times (6-connected) into the voxels at or above a lower threshold
``low``. Result and reading: training/README.md, lever table; grid:
benchmarks/results/grow_small_cfos_validation_2026-12-03.json.

    python scripts/lever_grow_small.py predict weights/manifest.yaml /tmp/grow 1147   # one-pass logits
    python scripts/lever_grow_small.py score /tmp/grow out.json                        # the grid

Needs the real data ($LSMSEG_DATA). One pass per window (no mirroring), as every lever row.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from lsmseg.inference.postprocess import remove_small_components
from lsmseg.inference.predictor import logit

SHIPPED = (0.9, 10, 0.5, 0, 0)  # (threshold, min, low, small, iters): no growing
GRID = [SHIPPED] + list(itertools.product((0.9, 0.95), (2, 4, 6), (0.3, 0.5, 0.7), (15, 30), (1, 2)))
KEYS = ("threshold", "min", "low", "small", "iters")


def predict(manifest: Path, out: Path, sources: list[str]) -> None:
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.io import read_volume
    from lsmseg.realdata import real_data_root

    folder = real_data_root() / "delivr" / "cfos"
    predictor = Predictor.from_manifest(manifest, options=RunOptions(progress=False))
    predictor.settings = dataclasses.replace(predictor.settings, per_structure={}, mirror_axes=())
    out.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for label in sorted((folder / "labels").glob(f"patchvolume_{source}_*.tif")):
            logits = predictor.predict_logits(read_volume(folder / "images" / label.name).load(), name=label.stem)
            np.savez_compressed(out / f"{label.stem}.npz", logits=logits, truth=read_volume(label).load() != 0)
            print(label.stem, flush=True)


def grown(logits: np.ndarray, threshold: float, min_voxels: int, low: float, small: int, iters: int) -> np.ndarray:
    """Components of ``p >= threshold`` with ``min_voxels`` or more; those under ``small`` voxels
    grown ``iters`` times (6-connected) into ``p >= low``."""
    core = remove_small_components((logits >= logit(threshold)).astype(np.uint8), min_voxels) != 0
    if iters == 0 or small == 0:
        return core
    components, count = ndimage.label(core, np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    seeds = (sizes < small)[components] & core
    return core | ndimage.binary_dilation(seeds, ndimage.generate_binary_structure(3, 1), iterations=iters,
                                          mask=logits >= logit(low))


def score(folder: Path, out: Path, grid=GRID) -> list[dict]:
    from lsmseg_training.tune import leaderboard_score

    volumes = [np.load(f) for f in sorted(folder.glob("*.npz"))]
    rows = []
    for combination in grid:
        scores = [leaderboard_score("cfos_neuron", grown(v["logits"], *combination).astype(np.uint8), v["truth"])
                  for v in volumes]
        row = dict(zip(KEYS, combination))
        row.update({key: round(float(np.nanmean([s[key] for s in scores])), 4) for key in scores[0]})
        rows.append(row)
        print(row, flush=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["predict"] and len(sys.argv) >= 5:
        predict(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:2] == ["score"] and len(sys.argv) == 4:
        score(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__.split("\n\n")[2])
