"""Lever measurement (2026-12-03): how DELiVR's c-Fos training patches are labelled, patch by patch.

    python scripts/lever_cfos_labels.py [SOURCE ...]     # default: the training sources 1008 1230

Per labelled patch: its labelled objects (26-connected), the labelled share of its voxels, the
median object size, and where the labelled voxels sit in the network's normalised intensity (the
patch's own 0.5-99.5th percentile range, log tail; 1 = the 99.5th percentile) against the patch's
median voxel. Four patches of brain 1008 (0, 2, 4, 6) mark hundreds of dim objects where the other
training patches mark a few bright ones; the fine-tuning run without them is
training/configs/general_finetune_real_logtail_cfos_sparse.yaml (result: training/README.md, lever
table). The default reads the training sources only: the choice was made there. Needs the real
data ($LSMSEG_DATA).
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

from lsmseg.realdata import real_data_root

TRAIN_SOURCES = ("1008", "1230")


def patches(sources=TRAIN_SOURCES) -> dict:
    """``{patch name: row}`` for every labelled c-Fos patch of ``sources``."""
    from lsmseg.io import read_volume
    from lsmseg.normalise import normalise_volume

    folder = real_data_root() / "delivr" / "cfos"
    table = {}
    for source in sources:
        for path in sorted((folder / "labels").glob(f"patchvolume_{source}_*.tif")):
            truth = read_volume(path).load() != 0
            if not truth.any():
                continue
            normalised = normalise_volume(read_volume(folder / "images" / path.name).load(), upper_tail="log")
            objects, count = ndimage.label(truth, np.ones((3, 3, 3)))
            sizes = np.bincount(objects.ravel())[1:]
            table[path.stem] = {
                "objects": int(count),
                "labelled_percent": round(float(truth.mean() * 100), 3),
                "median_object_voxels": float(np.median(sizes)),
                "label_p50": round(float(np.median(normalised[truth])), 3),
                "patch_p50": round(float(np.median(normalised)), 3),
            }
    for name, row in table.items():
        print(name, row)
    return table


if __name__ == "__main__":
    if any(not arg.isdigit() for arg in sys.argv[1:]):
        raise SystemExit(__doc__.split("\n\n")[1])
    patches(tuple(sys.argv[1:]) or TRAIN_SOURCES)
