"""Background skipping: which windows are uniformly dark and need not run the network.

Most of a whole-organ light-sheet volume is dark background outside the tissue. A window whose
content is uniformly at that dark level gives (up to noise) the network's output for a constant
window, so instead of running it the predictor blends in that output, computed once per volume.

The decision is made at low resolution: intensities are averaged over small cells (which removes
most shot noise) and a window is dark when every cell it touches is at or below a threshold. The
threshold comes from the volume's percentile subsample (the same one normalisation uses): Otsu's
split between background and tissue, but never more than a small margin above the darkest level,
so that dim tissue is never taken for background in volumes without a dark region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Cells of 4^3 voxels are averaged before the dark test (shot noise drops ~8x).
CELL = 4
# At most this far (in normalised units, 0..1) above the darkest level counts as dark.
MAX_MARGIN = 0.05
# Fewer dark cells than this in the subsample: no dark background worth skipping.
MIN_DARK_FRACTION = 0.02


@dataclass(frozen=True)
class Background:
    """The dark level of one volume, in normalised intensity units."""

    threshold: float  # cells with a mean <= threshold are dark
    level: float  # typical intensity of the dark background (the uniform window's value)
    dark_fraction: float  # share of the subsample's cells that are dark

    def as_dict(self) -> dict:
        return {"threshold": round(self.threshold, 5), "level": round(self.level, 5),
                "dark_fraction": round(self.dark_fraction, 4)}


def _pool(array: np.ndarray, cell: int) -> np.ndarray:
    """Mean over ``cell``-sized cells (partial cells at the edges averaged over what they hold)."""
    kernel = [max(1, min(cell, s)) for s in array.shape]
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return torch.nn.functional.avg_pool3d(tensor, kernel, kernel, ceil_mode=True)[0, 0].numpy()


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (numpy only: the inference image has no scikit-image)."""
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
    """
    sample = np.asarray(normalised_sample, dtype=np.float32)
    if sample.ndim != 3 or sample.size < 8:
        return None
    pooled = _pool(sample, 2).ravel()
    pooled = pooled[np.isfinite(pooled)]  # NaN/Inf voxels are the predictor's to report, not ours
    if pooled.size == 0 or float(pooled.max()) <= float(pooled.min()):
        return None
    darkest = float(np.percentile(pooled, 1))
    threshold = min(otsu_threshold(pooled), darkest + MAX_MARGIN)
    dark = pooled[pooled <= threshold]
    fraction = dark.size / pooled.size
    if fraction < MIN_DARK_FRACTION:
        return None
    return Background(threshold=threshold, level=float(np.median(dark)), dark_fraction=fraction)


def dark_windows(
    region: np.ndarray,
    origin: Sequence[int],
    corners: Sequence[Sequence[int]],
    roi: Sequence[int],
    background: Background,
) -> list[bool]:
    """For each window (corner in the same coordinates as ``origin``): is it uniformly dark?

    ``region`` is the normalised input that holds every window. Cells are aligned to the region's
    origin; a window tests every cell it touches, so a cell half inside still counts.
    """
    pooled = _pool(region, CELL)
    bright = pooled > background.threshold
    # Summed-area table over bright cells: "any bright cell in a box" in O(1) per window.
    table = np.zeros([s + 1 for s in bright.shape], dtype=np.int64)
    table[1:, 1:, 1:] = bright.cumsum(0).cumsum(1).cumsum(2)
    flags = []
    for corner in corners:
        lo = [(c - o) // CELL for c, o in zip(corner, origin)]
        hi = [min(-(-(c - o + r) // CELL), n) for c, o, r, n in zip(corner, origin, roi, bright.shape)]
        (z0, y0, x0), (z1, y1, x1) = lo, hi
        count = (
            table[z1, y1, x1] - table[z0, y1, x1] - table[z1, y0, x1] - table[z1, y1, x0]
            + table[z0, y0, x1] + table[z0, y1, x0] + table[z1, y0, x0] - table[z0, y0, x0]
        )
        flags.append(bool(count == 0))
    return flags
