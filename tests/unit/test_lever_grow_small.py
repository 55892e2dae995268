"""scripts/lever_grow_small.py: small components grown into the voxels above a lower threshold."""

import numpy as np

from ..conftest import load_script


def test_only_small_components_grow_and_only_into_the_lower_threshold():
    grown = load_script("lever_grow_small").grown
    logits = np.full((9, 20, 20), -10.0, np.float32)
    logits[4, 4, 4] = 5.0  # a one-voxel core
    logits[4, 4, 5:8] = 0.0  # p = 0.5 beside it: reached with low 0.3, not 0.7
    logits[2:7, 10:16, 10:16] = 5.0  # a large core
    logits[4, 10:16, 16] = 0.0  # p = 0.5 beside the large core: never grown into
    plain = grown(logits, 0.9, 1, 0.3, 0, 0)
    assert plain.sum() == 1 + 5 * 6 * 6
    assert grown(logits, 0.9, 2, 0.3, 0, 0).sum() == 5 * 6 * 6  # min 2 removes the one-voxel core
    once = grown(logits, 0.9, 1, 0.3, 15, 1)
    assert once.sum() == plain.sum() + 1 and once[4, 4, 5]
    assert grown(logits, 0.9, 1, 0.3, 15, 3).sum() == plain.sum() + 3
    assert grown(logits, 0.9, 1, 0.7, 15, 3).sum() == plain.sum()
