"""Sliding-window helpers: window grid, padding, blending weights.

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
    """Step between window starts along one axis (MONAI's rule).

    Args:
        size: the (padded) axis length.
        roi: the window's length along the axis.
        overlap: the overlap of neighbouring windows as a fraction of ``roi``, in [0, 1).
    """
    if roi == size:
        return roi
    return grid_step(roi, overlap)


def grid_step(roi: int, overlap: float) -> int:
    """Step between window starts along an axis longer than the window (MONAI's rule).

    Args:
        roi: the window's length along the axis.
        overlap: the overlap of neighbouring windows as a fraction of ``roi``, in [0, 1).
    """
    return max(int(roi * (1.0 - overlap)), 1)


def axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start positions along one axis of length ``size >= roi``; the last window is flush.

    Args as in :func:`scan_interval`.
    """
    if size < roi:
        raise ValueError(f"axis of length {size} is shorter than the window {roi}; pad first")
    step = scan_interval(size, roi, overlap)
    count = next(i for i in range(math.ceil(size / step) + 1) if i * step + roi >= size) + 1
    return [min(i * step, size - roi) for i in range(count)]


def window_starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """All window corners over a (padded) volume, in MONAI's order (last axis fastest).

    Args:
        shape: the padded volume's shape.
        roi: the window's shape.
        overlap: the overlap as a fraction of the window.
    """
    per_axis = [axis_starts(s, r, overlap) for s, r in zip(shape, roi)]
    grid = np.meshgrid(*per_axis, indexing="ij")
    return [tuple(int(v) for v in corner) for corner in np.stack([g.ravel() for g in grid], axis=1)]


def pad_widths(shape: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Symmetric padding that makes every axis at least one window long (MONAI's split).

    Args:
        shape: the volume's shape.
        roi: the window's shape.
    """
    widths = []
    for size, window in zip(shape, roi):
        missing = max(window - size, 0)
        widths.append((missing // 2, missing - missing // 2))
    return tuple(widths)


@lru_cache(maxsize=8)
def _blend_weights(roi: tuple[int, ...], mode: str, sigma_scale: float) -> torch.Tensor:
    from monai.data.utils import compute_importance_map

    return compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device="cpu", dtype=torch.float32)


def blend_weights(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> torch.Tensor:
    """Per-voxel window weights, as MONAI computes them (cached; float32 on the CPU).

    Args:
        roi: the window's shape (z, y, x).
        mode: ``"gaussian"`` (the centre counts most) or ``"constant"``.
        sigma_scale: the Gaussian's sigma as a fraction of the window.
    """
    return _blend_weights(tuple(int(r) for r in roi), mode, float(sigma_scale))
