"""The one intensity normalisation, shared by training, evaluation and inference.

Light-sheet volumes are mostly dark background with a long bright tail (autofluorescence, debris),
so intensities are clipped to robust percentiles and scaled to [0, 1]. Percentiles of a whole-organ
volume are estimated on a regular subsample so that every block of a volume, and every training
patch of it, is normalised with the same two numbers.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_LOWER = 0.5
DEFAULT_UPPER = 99.5
DEFAULT_MAX_SAMPLES = 4_000_000
# Above the upper percentile: "clip" saturates at 1; "log" continues as 1 + ln(x), so that objects
# brighter than the haze around them stay brighter. Sparse bright objects need it: in DELiVR's
# microglia patches of brain 7466 every labelled voxel lies above the 99.5th percentile, and
# nine in ten voxels there are not labelled (training/README.md).
UPPER_TAILS = ("clip", "log")


def subsample(array, max_samples: int = DEFAULT_MAX_SAMPLES) -> np.ndarray:
    """A regular grid subsample of a 3-D array (numpy or lazy) with at most ~``max_samples`` voxels.

    Deterministic (no random numbers) so that the same volume always gives the same percentiles;
    whole planes are read with a stride so that lazy readers touch few planes.

    Args:
        array: a 3-D array or lazy array-like (z, y, x).
        max_samples: the most voxels to keep (about; a volume that small is returned whole).
    """
    shape = tuple(int(s) for s in array.shape)
    total = math.prod(shape)
    if total <= max_samples:
        return np.asarray(array[...])
    step = (total / max_samples) ** (1.0 / 3.0)
    steps = [max(1, int(math.floor(step))) for _ in shape]
    # Never keep fewer than 8 planes: keeps z-variation (attenuation) in the estimate.
    steps[0] = min(steps[0], max(1, shape[0] // 8))
    while math.prod(math.ceil(s / k) for s, k in zip(shape, steps)) > 2 * max_samples:
        # Thin y and x cannot shrink further (a long line of 1 x 1 planes): stride z instead.
        axes = [axis for axis in (1, 2) if steps[axis] < shape[axis]] or [0]
        for axis in axes:
            steps[axis] += 1
    z_index = range(0, shape[0], steps[0])
    planes = [np.asarray(array[z, :: steps[1], :: steps[2]]) for z in z_index]
    return np.stack(planes)


def percentiles(
    array, lower: float = DEFAULT_LOWER, upper: float = DEFAULT_UPPER, max_samples: int = DEFAULT_MAX_SAMPLES
) -> tuple[float, float]:
    """Robust intensity range ``(lo, hi)`` of a volume, ignoring non-finite values.

    Args:
        array: a 3-D array or lazy array-like.
        lower, upper: the percentiles (0..100) that map to 0 and 1.
        max_samples: size of the subsample they are computed on (:func:`subsample`).
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
    # The native dtype (uint16: 2 bytes a voxel, not 8): np.percentile interpolates in float64 anyway,
    # and this sample is what grows with the volume's size up to the cap.
    sample = subsample(array, max_samples).ravel()
    if sample.dtype == bool:  # a binary image: intensities 0 and 1 (NumPy cannot interpolate booleans)
        sample = sample.view(np.uint8)
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(sample, [lower, upper])
    if hi <= lo:
        # More than (100 - upper) % of the voxels hold one value (background-subtracted data: exact
        # zeros) and the percentiles meet: the same percentiles of the voxels on either side of that
        # value keep the rest's contrast, which the collapsed range would normalise away (their
        # min/max would hand the scale to one hot pixel: tissue at 100-1000 beside one 65535 voxel
        # was squeezed into 0..0.015). A constant sample stays at hi == lo.
        below, above = sample[sample < lo], sample[sample > hi]
        if below.size:
            lo = np.percentile(below, lower)
        if above.size:
            hi = np.percentile(above, upper)
    return float(lo), float(hi)


def normalise(array, lo: float, hi: float, upper_tail: str = "clip") -> np.ndarray:
    """Scale ``array`` so that ``lo -> 0`` and ``hi -> 1``, as float32; values below ``lo`` become 0.

    A constant volume (``hi <= lo``) maps to zeros: there is no contrast to segment.

    Args:
        array: intensities (any shape).
        lo, hi: the volume's range (:func:`percentiles`).
        upper_tail: what happens above ``hi``: ``"clip"`` saturates at 1; ``"log"`` maps a scaled
            value ``x > 1`` to ``1 + ln(x)`` (continuous, slope 1 at 1, slow growth: a voxel 20x
            brighter than ``hi`` becomes 4.0).
    """
    if upper_tail not in UPPER_TAILS:
        raise ValueError(f"upper_tail {upper_tail!r} must be one of {', '.join(UPPER_TAILS)}")
    data = np.asarray(array)
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    scale = 1.0 / (hi - lo)
    # float32 (half the memory) unless the scale or a float64 voxel is beyond it: inf, then NaN
    # after the subtraction, would reach the network as a silent empty mask. (min/max: two passes
    # over the data, no copy of it.)
    largest = float(np.finfo(np.float32).max)
    wide = abs(scale) > largest or (data.dtype.kind == "f" and data.dtype.itemsize > 4 and data.size > 0
                                     and max(abs(float(data.min())), abs(float(data.max()))) > largest)
    dtype = np.float64 if wide else np.float32
    out = (np.asarray(data, dtype=dtype) - dtype(lo)) * dtype(scale)
    if upper_tail == "clip":
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
    np.maximum(out, 0.0, out=out)
    above = out > 1.0
    out[above] = 1.0 + np.log(out[above])
    return out.astype(np.float32, copy=False)


def is_constant(data, planes_per_read: int = 16) -> bool:
    """Whether a volume (numpy or lazy) holds one finite value everywhere: nothing to segment.

    A lazy volume is read a few planes at a time, and only until a second value shows.

    Args:
        data: a 3-D array or lazy array-like.
        planes_per_read: z-planes per read of a lazy volume.
    """
    if isinstance(data, np.ndarray):
        return data.size > 0 and _holds_one_value([data])
    slabs = (np.asarray(data[z : z + planes_per_read]) for z in range(0, int(data.shape[0]), planes_per_read))
    return _holds_one_value(slabs)


def _holds_one_value(slabs) -> bool:
    first = None
    for slab in slabs:
        if first is None:
            if slab.size == 0:
                return False
            first = slab.flat[0]
            if slab.dtype.kind == "f" and not np.isfinite(first):
                return False
        if not np.all(slab == first):
            return False
    return first is not None


def normalise_volume(
    array, lower: float = DEFAULT_LOWER, upper: float = DEFAULT_UPPER, max_samples: int = DEFAULT_MAX_SAMPLES,
    upper_tail: str = "clip",
) -> np.ndarray:
    """Percentile-normalise a whole (in-memory) volume in one call (arguments as for :func:`percentiles`
    and :func:`normalise`)."""
    lo, hi = percentiles(array, lower, upper, max_samples)
    return normalise(array, lo, hi, upper_tail)
