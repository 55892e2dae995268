"""Turning label and prediction arrays into boolean masks, refusing what is not a mask.

Label schemes (``--label-scheme``):

* ``binary`` (default): background 0 and one foreground value (0/1, 0/255, 0/254, True/False).
  More than one non-zero value is refused as "non-binary", so that an instance map or a sparse
  label is never scored by accident.
* ``nonzero``: any non-zero value is foreground (instance label maps).
* ``sparse``: TRAILMAP-style partial annotation. 0 = unlabelled (ignored), 1 = background,
  2 = foreground, 3 = artifact (scored as background: TRAILMAP labels bright non-axon structures
  this way), 4 = edge (ignored by default). TRAILMAP adds the edge label automatically to
  unannotated voxels touching an annotated axon, so these voxels carry the annotator's boundary
  uncertainty rather than a decision; ``sparse_edge="background"`` scores them as background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lsmseg.errors import InputError

LABEL_SCHEMES = ("binary", "nonzero", "sparse")
SPARSE_EDGE_MODES = ("ignore", "background")
SPARSE_VALUES = {0: "unlabelled", 1: "background", 2: "foreground", 3: "artifact", 4: "edge"}
SPARSE_FOREGROUND, SPARSE_UNLABELLED, SPARSE_EDGE = 2, 0, 4


def distinct_values(array: np.ndarray, limit: int = 8) -> list:
    """Sorted distinct values of ``array`` (at most ``limit + 1`` of them, enough to complain)."""
    array = np.asarray(array)
    if array.dtype == bool:
        values = np.flatnonzero(np.bincount(array.ravel().view(np.uint8), minlength=2))
    elif array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        values = np.flatnonzero(np.bincount(array.ravel()))  # fast for 8/16-bit masks
    else:
        values = np.unique(array)
    out = [v.item() for v in values[: limit + 1]]
    return out


def _format_values(values: list, limit: int = 8) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _refuse_non_finite(array: np.ndarray, path: str | Path, what: str) -> None:
    """NaN/Inf is no mask value: ``!= 0`` would silently make every NaN voxel foreground."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise InputError(path, f"{what} contains NaN/Inf values")


def prediction_mask(array: np.ndarray, path: str | Path) -> np.ndarray:
    """A prediction must be a binary mask (0 and one other finite value, e.g. 0/1 or 0/255)."""
    array = np.asarray(array)
    _refuse_non_finite(array, path, "prediction")
    values = distinct_values(array)
    nonzero = [v for v in values if v != 0]
    if len(nonzero) > 1:
        hint = " (probabilities? threshold them first)" if array.dtype.kind == "f" else ""
        raise InputError(path, f"prediction is not a binary mask: values {_format_values(values)}{hint}")
    return array != 0


def label_masks(
    array: np.ndarray, path: str | Path, scheme: str = "binary", sparse_edge: str = "ignore"
) -> tuple[np.ndarray, np.ndarray | None]:
    """(foreground, valid) for a label array; ``valid`` is None when every voxel is labelled."""
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"label scheme must be one of {LABEL_SCHEMES}, got {scheme!r}")
    if sparse_edge not in SPARSE_EDGE_MODES:
        raise ValueError(f"sparse_edge must be one of {SPARSE_EDGE_MODES}, got {sparse_edge!r}")
    array = np.asarray(array)
    if scheme != "sparse":  # sparse labels refuse NaN/Inf below, as values outside 0-4
        _refuse_non_finite(array, path, "label")
    if scheme == "nonzero":
        return array != 0, None
    values = distinct_values(array)
    if scheme == "binary":
        nonzero = [v for v in values if v != 0]
        if len(nonzero) > 1:
            raise InputError(
                path,
                f"non-binary label: values {_format_values(values)}; use --label-scheme sparse for "
                "0 unlabelled / 1 background / 2 foreground labels, or --label-scheme nonzero to "
                "score every non-zero value as foreground",
            )
        return array != 0, None
    check_sparse_values(values, path)
    foreground, valid = sparse_masks(array, sparse_edge)
    if not valid.any():
        ignored = "0 = unlabelled and 4 = edge, ignored" if sparse_edge == "ignore" else "0 = unlabelled"
        raise InputError(path, f"sparse label has no labelled voxels (only {ignored})")
    return foreground, valid


def check_sparse_values(values: list, path: str | Path) -> None:
    """Refuse a sparse label holding a value outside :data:`SPARSE_VALUES` (its meaning is unknown)."""
    unknown = [v for v in values if v not in SPARSE_VALUES]
    if unknown:
        raise InputError(
            path,
            f"sparse label has values {_format_values(values)}; expected only 0 (unlabelled), "
            "1 (background), 2 (foreground), 3 (artifact), 4 (edge)",
        )


def sparse_masks(array: np.ndarray, sparse_edge: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
    """(foreground, valid) of a sparse label whose values :func:`check_sparse_values` accepted: the one
    reading of TRAILMAP labels that evaluation and training share (2 foreground; 1 and 3 background, as
    TRAILMAP's own loss treats artifacts; 0 and, unless ``sparse_edge="background"``, 4 not counted)."""
    ignored = (SPARSE_UNLABELLED, SPARSE_EDGE) if sparse_edge == "ignore" else (SPARSE_UNLABELLED,)
    return array == SPARSE_FOREGROUND, ~np.isin(array, ignored)
