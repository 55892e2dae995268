"""A picture of each mask for a quick look: the input's maximum-intensity projection along z with
the mask's projection drawn over it, one PNG beside the mask (``lsmseg predict --preview``).

Built from the mask's blocks as they are written, so that its memory is the picture's, not the
volume's: each block's projection is max-pooled to the picture's scale before it is kept. The
input block is read a second time for it (the predictor's copy is normalised and gone by then).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..errors import printable, single_line
from ..io import Volume, atomic_output
from ..normalise import normalise, percentiles

logger = logging.getLogger(__name__)

PREVIEW_SUFFIX = ".preview.png"
MAX_SIDE = 1024  # the picture's longest side, in pixels; larger planes are max-pooled down
MASK_COLOUR = np.array([255, 40, 160], np.float32)  # magenta: stands out against the grey input
MASK_OPACITY = 0.45  # inside the mask; its outline is drawn opaque


def preview_path_for(output_path: str | Path) -> Path:
    """``<mask file name>.preview.png`` beside the mask (as its provenance JSON)."""
    output_path = Path(output_path)
    return output_path.parent / f"{output_path.name}{PREVIEW_SUFFIX}"


def remove_stale_preview(output_path: str | Path) -> None:
    """Remove the picture of the mask that a new ``output_path`` replaced, when no new picture was
    made (a run without ``--preview``, or one whose picture failed): it would show another mask."""
    path = preview_path_for(output_path)
    try:
        if path.is_symlink() or path.is_file():  # a link is removed, never followed; a folder is kept
            path.unlink(missing_ok=True)
    except OSError as exc:  # the new mask is in place: an old picture must not fail it
        logger.warning("%s: cannot remove the picture of the replaced mask (%s)", printable(path),
                       single_line(exc.strerror or exc))


class ProjectionPreview:
    """Maximum projections along z of a volume and of its mask, accumulated block by block.

    Args:
        volume: the input whose mask is being written (read again, block by block).
        max_side: the picture's longest side in pixels; the factor that pools the plane down is
            the same along y and x, so that the picture keeps the plane's proportions.
    """

    def __init__(self, volume: Volume, *, max_side: int = MAX_SIDE):
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        _, height, width = volume.shape
        self.volume = volume
        self.max_side = max_side
        self.factor = max(1, math.ceil(max(height, width) / max_side))
        shape = (math.ceil(height / self.factor), math.ceil(width / self.factor))
        self.image = np.full(shape, np.nan, np.float32)  # NaN: no block seen there yet
        self.mask = np.zeros(shape, bool)

    def put(self, index: tuple[slice, slice, slice], mask_block: np.ndarray) -> None:
        """Add one mask block (any non-zero voxel is foreground) and the input block under it."""
        image_block = np.asarray(self.volume.data[index])
        if image_block.dtype == bool:
            image_block = image_block.view(np.uint8)
        # fmax skips NaN voxels of a float input instead of spreading them over the projection.
        self._pool_into(self.image, np.fmax.reduce(image_block, axis=0).astype(np.float32), index)
        self._pool_into(self.mask, np.any(mask_block, axis=0), index)

    def _pool_into(self, target: np.ndarray, plane: np.ndarray, index: tuple[slice, ...]) -> None:
        """Max-pool ``plane`` (rows and columns from ``index``) onto ``target``'s grid and keep the maximum."""
        f = self.factor
        y0, x0 = index[1].start or 0, index[2].start or 0
        # Pad so the plane starts and ends on the picture's grid: a cell cut by a block border is
        # completed by the next block, through the running maximum.
        top, left = y0 % f, x0 % f
        bottom, right = -(top + plane.shape[0]) % f, -(left + plane.shape[1]) % f
        fill = False if plane.dtype == bool else np.nan
        padded = np.pad(plane, ((top, bottom), (left, right)), constant_values=fill)
        cells = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f)
        rows = slice(y0 // f, y0 // f + cells.shape[0])
        cols = slice(x0 // f, x0 // f + cells.shape[2])
        if plane.dtype == bool:
            target[rows, cols] |= cells.any(axis=(1, 3))
        else:
            target[rows, cols] = np.fmax(target[rows, cols], np.fmax.reduce(np.fmax.reduce(cells, axis=3), axis=1))

    def picture(self) -> np.ndarray:
        """The picture as ``(rows, columns, 3)`` uint8: the projection in grey (1st to 99.5th
        percentile), the mask tinted and outlined over it; square pixels in micrometres where the
        y and x spacings differ (:meth:`_square_pixels`)."""
        low, high = percentiles(self.image[None], 1.0, 99.5)  # the package's normaliser; NaN ignored
        grey = normalise(np.nan_to_num(self.image, nan=low), low, high) * 255.0
        grey, mask = self._square_pixels(grey), self._square_pixels(self.mask)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb[mask] = (1.0 - MASK_OPACITY) * rgb[mask] + MASK_OPACITY * MASK_COLOUR
        rgb[_outline(mask)] = MASK_COLOUR
        return np.rint(rgb).astype(np.uint8)

    def _square_pixels(self, plane: np.ndarray) -> np.ndarray:
        """``plane`` resampled so that a pixel is as tall as it is wide in micrometres (a round
        cell stays round), at the finer axis's pitch unless the longest side would exceed
        ``max_side``; unchanged when the spacing is unknown or y and x spacings are equal.

        Each new pixel takes the maximum of the pixels it covers (a thin vessel is not dropped
        where an axis shrinks) or repeats the one it lies in (where an axis grows)."""
        spacing = self.volume.spacing
        if not spacing or spacing[1] == spacing[2]:
            return plane
        pitch_y, pitch_x = self.factor * spacing[1], self.factor * spacing[2]  # micrometres a pixel now
        height, width = plane.shape[0] * pitch_y, plane.shape[1] * pitch_x
        pitch = max(min(pitch_y, pitch_x), max(height, width) / self.max_side)
        for axis, extent in ((0, height), (1, width)):
            size = max(1, round(extent / pitch))
            starts = np.arange(size) * plane.shape[axis] // size  # first old pixel of each new one
            reduce = np.logical_or if plane.dtype == bool else np.fmax
            plane = reduce.reduceat(plane, starts, axis=axis)  # a repeated start repeats that pixel
        return plane

    def write(self, path: str | Path) -> Path:
        """Write the picture to ``path`` (PNG) atomically; return the path."""
        import SimpleITK as sitk

        path = Path(path)
        with atomic_output(path) as tmp:
            sitk.WriteImage(sitk.GetImageFromArray(self.picture(), isVector=True), str(tmp))
        return path


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the picture's edge)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


class PreviewRecorder:
    """A :class:`ProjectionPreview` that never costs the mask: a failure while collecting or
    writing it is one warning, and the mask is written without its picture.

    Args:
        volume: the input.
        path: where the picture goes.
    """

    def __init__(self, volume: Volume, path: str | Path):
        self.path = Path(path)
        self._preview: ProjectionPreview | None = ProjectionPreview(volume)

    def put(self, index, mask_block) -> None:
        if self._preview is None:
            return
        try:
            self._preview.put(index, mask_block)
        except Exception as exc:  # noqa: BLE001 - a picture must never cost the mask
            self._give_up(exc)

    def finish(self) -> str | None:
        """Write the picture; return its path as text, or None when it could not be made."""
        if self._preview is None:
            return None
        try:
            return str(self._preview.write(self.path))
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)
            return None

    def _give_up(self, exc: Exception) -> None:
        self._preview = None
        logger.warning("%s: no preview picture (%s)", printable(self.path), single_line(exc))
