"""Pure helpers for sliding-window inference: window grid, padding, blending weights.

The grid is MONAI's (``sliding_window_inference``): the same scan interval and the same window
positions, so that a volume predicted here and with MONAI on the same model gives the same result.
Positions are defined on the whole (padded) volume, never per block, which is what lets a
block-wise pass reproduce the in-memory result exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch


def scan_interval(size: int, roi: int, overlap: float) -> int:
    """Step between window starts along one axis (MONAI's rule)."""
    if roi == size:
        return roi
    return max(int(roi * (1.0 - overlap)), 1)


def axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start positions along one axis of length ``size >= roi``; the last window is flush."""
    if size < roi:
        raise ValueError(f"axis of length {size} is shorter than the window {roi}; pad first")
    step = scan_interval(size, roi, overlap)
    count = next(i for i in range(math.ceil(size / step) + 1) if i * step + roi >= size) + 1
    return [min(i * step, size - roi) for i in range(count)]


def spread_starts(size: int, window: int, min_overlap: int) -> list[int]:
    """Window starts along one axis of length ``size >= window``, spread evenly, overlapping >= ``min_overlap``.

    The fewest windows whose neighbours overlap by at least ``min_overlap`` voxels (a fixed halo,
    whatever the window size); the first is at 0, the last flush with the end.
    """
    if size < window:
        raise ValueError(f"axis of length {size} is shorter than the window {window}; pad first")
    if not 0 <= min_overlap < window:
        raise ValueError(f"overlap {min_overlap} must be in [0, {window})")
    if size == window:
        return [0]
    count = -(-(size - window) // (window - min_overlap)) + 1
    # Floor keeps every step <= window - min_overlap (the mean step is, and steps differ by <= 1).
    return [i * (size - window) // (count - 1) for i in range(count)]


def inference_window(shape: Sequence[int], roi: Sequence[int], window: Sequence[int] | None) -> tuple[int, int, int]:
    """The window used on a volume of ``shape``: ``window`` (or ``roi``) clamped per axis.

    An axis never exceeds the volume rounded up to 32 (no window larger than needed, so little
    padding), and never falls below the training ``roi`` (what MONAI pads small volumes to).
    """
    wanted = roi if window is None else window
    return tuple(max(int(r), min(int(w), -(-int(s) // 32) * 32)) for s, r, w in zip(shape, roi, wanted))  # type: ignore[return-value]


def window_starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """All window corners over a (padded) volume, in MONAI's order (last axis fastest)."""
    per_axis = [axis_starts(s, r, overlap) for s, r in zip(shape, roi)]
    grid = np.meshgrid(*per_axis, indexing="ij")
    return [tuple(int(v) for v in corner) for corner in np.stack([g.ravel() for g in grid], axis=1)]


def pad_widths(shape: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Symmetric padding that makes every axis at least one window long (MONAI's split)."""
    widths = []
    for size, window in zip(shape, roi):
        missing = max(window - size, 0)
        widths.append((missing // 2, missing - missing // 2))
    return tuple(widths)


def crop_padding(array: np.ndarray, widths: Sequence[tuple[int, int]]) -> np.ndarray:
    index = tuple(slice(before, array.shape[axis] - after) for axis, (before, after) in enumerate(widths))
    return array[index]


@lru_cache(maxsize=8)
def _blend_weights_cpu(roi: tuple[int, ...], mode: str, sigma_scale: float) -> torch.Tensor:
    from monai.data.utils import compute_importance_map

    return compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device="cpu", dtype=torch.float32)


def blend_weights(
    roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-voxel window weights (Gaussian: centre counts most); cached, as MONAI computes them."""
    return _blend_weights_cpu(tuple(int(r) for r in roi), mode, float(sigma_scale)).to(device)


def batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
