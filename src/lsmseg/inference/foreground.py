"""Background skipping: a prior that uniformly dark windows hold nothing.

Most of a whole-organ light-sheet volume is dark background outside the tissue. A window whose
content is uniformly at that dark level is assumed to hold no structure: instead of running the
network on it, the predictor blends in the network's output for a *constant* window at the
background level (computed once per volume), which a trained model marks as background.

This is a prior, not a shortcut to the same answer: skipping changes the mask in those windows.
On normalised dark *noise* the network can answer with false structures, which skipping removes
(benchmarks/README.md, earlier weights: the skipped and unskipped masks of the wide-field phantom
agree only to Dice 0.48, and the skipped one is the better, Dice against the truth 0.46 against
0.19). What a skipped window contributes is the *mean* of the network's answer to a constant window,
uniformly: the answer itself depends on the weights, and the real-data general model shipped now
rises above the threshold near a constant window's faces (~2 % of it), so a field of skipped windows
contributing it added false structure (on the sample beside a dark field, 9487 false voxels against
2621 without skipping; with the mean, none; tests/unit/test_foreground.py checks the prior with the
shipped weights against the labels). Where a dark window could hold dim structure,
``--no-skip-background`` runs every window.

The decision is made at low resolution: intensities are averaged over small cells (which removes
most shot noise). A window is dark when no 2^3 cell it touches exceeds a *ceiling* (halfway between the
background and the typical tissue: a bright object is never skipped, even a small one) and at most a tiny share of its
cells exceed the *threshold* (the dark level plus its noise tail: a window of thousands of cells in a
noisy dark field always holds a few noisy ones). Both come from the volume's percentile subsample
(the same one normalisation uses); the dark set is Otsu's lower class but never more than a small
margin above the darkest level, so that dim tissue is never taken for background in volumes
without a dark region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Cells of 4^3 voxels are averaged before the dark test (shot noise drops ~8x).
CELL = 4
# The ceiling is tested on cells of 2^3, the pooling it is derived at (estimate_background): a
# small object split across 4^3 cells falls below it there (a 30-voxel cell 9x the dark level was
# skipped whenever its centre sat on a cell border).
FINE = 2
# At most this far (in normalised units, 0..1) above the darkest level counts as dark.
MAX_MARGIN = 0.05
# Noise allowance above the dark level, in standard deviations of the 2^3-pooled dark background.
NOISE_SIGMAS = 4.0
# Share of a dark window's cells that may lie between ``threshold`` and ``ceiling`` (noise tail).
NOISY_CELLS = 0.005
# Fewer dark cells than this in the subsample: no dark background worth skipping.
MIN_DARK_FRACTION = 0.02


@dataclass(frozen=True)
class Background:
    """The dark level of one volume, in normalised intensity units."""

    threshold: float  # cells with a mean <= threshold are dark
    level: float  # typical intensity of the dark background (the uniform window's value)
    dark_fraction: float  # share of the subsample's cells that are dark
    # No cell of a dark window may exceed this (halfway from the background to the typical tissue):
    # a rare noisy cell above ``threshold`` is tolerated, a bright object is not.
    ceiling: float

    def as_dict(self) -> dict:
        return {"threshold": round(self.threshold, 5), "level": round(self.level, 5),
                "dark_fraction": round(self.dark_fraction, 4),
                "ceiling": round(self.ceiling, 5)}


def _pool(array: np.ndarray, cell: int, fine: int | None = None) -> np.ndarray:
    """Mean over ``cell``-sized cells (partial cells at the edges averaged over what they hold); with
    ``fine``, the largest mean of the ``fine``-sized cells inside each cell instead (same grid)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if fine is None:
        kernel = [max(1, min(cell, s)) for s in array.shape]
        return torch.nn.functional.avg_pool3d(tensor, kernel, kernel, ceil_mode=True)[0, 0].numpy()
    kernel = [max(1, min(fine, s)) for s in array.shape]
    means = torch.nn.functional.avg_pool3d(tensor, kernel, kernel, ceil_mode=True)
    # Each cell's fine cells (an edge cell may hold fewer of them, or be thinner than one).
    kernel = [max(1, min(cell // k, s)) for k, s in zip(kernel, means.shape[2:])]
    return torch.nn.functional.max_pool3d(means, kernel, kernel, ceil_mode=True)[0, 0].numpy()


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (numpy only: the inference image has no scikit-image).

    Args:
        values: the sample (any shape; flattened).
        bins: histogram bins.
    """
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def estimate_background(normalised_sample: np.ndarray) -> Background | None:
    """The dark background of a volume from its normalised subsample, or None if it has none.

    The subsample is a strided grid (see :func:`lsmseg.normalise.subsample`); it is pooled by 2 so
    that its noise is comparable with the pooled cells tested per window.

    Args:
        normalised_sample: the volume's subsample, normalised to [0, 1].
    """
    sample = np.asarray(normalised_sample, dtype=np.float32)
    if sample.ndim != 3 or sample.size < 8:
        return None
    pooled = _pool(sample, 2).ravel()
    pooled = pooled[np.isfinite(pooled)]  # NaN/Inf voxels are the predictor's to report, not ours
    if pooled.size == 0 or float(pooled.max()) <= float(pooled.min()):
        return None
    darkest = float(np.percentile(pooled, 1))
    otsu = otsu_threshold(pooled)
    threshold = min(otsu, darkest + MAX_MARGIN)
    dark = pooled[pooled <= threshold]
    fraction = dark.size / pooled.size
    if fraction < MIN_DARK_FRACTION:
        return None
    level = float(np.median(dark))
    # A window is dark only if every one of its (thousands of) cells is: a threshold inside the
    # background's noise would then skip almost nothing in a noisy dark field. Allow the noise's
    # tail (NOISE_SIGMAS x its spread, read off the untruncated lower side), never beyond Otsu's
    # split between background and tissue.
    spread = level - float(np.percentile(dark, 15.87))
    threshold = max(threshold, min(otsu, level + NOISE_SIGMAS * spread))
    # The ceiling: halfway from the background to the typical tissue, where a cell is more tissue than
    # background (Otsu's own split sits anywhere in the gap of well-separated classes, even at its
    # dark end).
    tissue = pooled[pooled > otsu]
    ceiling = (level + float(np.median(tissue))) / 2 if tissue.size else otsu
    return Background(threshold=threshold, level=level, dark_fraction=fraction, ceiling=max(ceiling, threshold))


def dark_windows(
    region: np.ndarray,
    origin: Sequence[int],
    corners: Sequence[Sequence[int]],
    roi: Sequence[int],
    background: Background,
) -> list[bool]:
    """For each window (corner in the same coordinates as ``origin``): is it uniformly dark?

    Cells are aligned to each window's own corner, so a window is judged on its own voxels: the
    same in every block whose region holds it, wherever the region starts (a window off the cell
    grid of a region, the flush last one of an axis, would otherwise take in voxels beyond its faces
    in one block and not in the next). Windows are grouped by their offset within the cells; each
    group pools the box holding its windows. A window whose edge is no multiple of the cell (never for Swin
    UNETR's ROI, a multiple of 32) also tests the cell its last face cuts.

    Args:
        region: the normalised input that holds every window.
        origin: the region's first voxel, in the corners' coordinates.
        corners: each window's first voxel.
        roi: the window's shape.
        background: the volume's dark level (:func:`estimate_background`).
    """
    flags = [False] * len(corners)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, corner in enumerate(corners):
        groups.setdefault(tuple((c - o) % CELL for c, o in zip(corner, origin)), []).append(index)
    for indices in groups.values():
        # Only the box that holds the group's windows is pooled: the flush last windows of an axis
        # (the off-grid groups) take a slab of the region, not all of it again.
        starts = [[c - o for c, o in zip(corners[index], origin)] for index in indices]
        box_lo = [min(start[axis] for start in starts) for axis in range(3)]
        box_hi = [min(max(start[axis] for start in starts) + roi[axis], region.shape[axis]) for axis in range(3)]
        # One float32 copy of the box, which both poolings read (_pool copies nothing more).
        box = np.ascontiguousarray(region[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))], dtype=np.float32)
        pooled = _pool(box, CELL)
        # Summed-area tables: "how many cells above a level in a box" in O(1) per window.
        above = _box_counter(pooled > background.threshold)
        above_ceiling = _box_counter(_pool(box, CELL, FINE) > background.ceiling)
        for index, corner in zip(indices, starts):
            start = [c - b for c, b in zip(corner, box_lo)]
            lo = [s // CELL for s in start]
            hi = [min(-(-(s + r) // CELL), n) for s, r, n in zip(start, roi, pooled.shape)]
            cells = (hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2])
            flags[index] = above_ceiling(lo, hi) == 0 and above(lo, hi) <= NOISY_CELLS * cells
    return flags


def _box_counter(flags: np.ndarray):
    table = np.zeros([s + 1 for s in flags.shape], dtype=np.int64)
    table[1:, 1:, 1:] = flags.cumsum(0).cumsum(1).cumsum(2)

    def count(lo, hi) -> int:
        (z0, y0, x0), (z1, y1, x1) = lo, hi
        return int(
            table[z1, y1, x1] - table[z0, y1, x1] - table[z1, y0, x1] - table[z1, y1, x0]
            + table[z0, y0, x1] + table[z0, y1, x0] + table[z1, y0, x0] - table[z0, y0, x0]
        )

    return count
