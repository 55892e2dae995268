"""Probability maps written beside the masks (``lsmseg predict --save-probabilities DIR``).

Same names and formats as the masks; uint8 (p = value / 255, the default: a quarter of float32's
size) or float16 (float32 in NIfTI/MHA/NRRD, which have no 16-bit float). For users who threshold
themselves or look at the model's uncertainty.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from ..io import Volume, mask_format_for, remove_output, write_mask_blocks

PROBABILITY_DTYPES = ("uint8", "float16")


def probability_blocks(logits: np.ndarray, dtype: str) -> np.ndarray:
    """Foreground probability of logits: uint8 round(255 p), or float16/float32 p.

    Args:
        logits: the network's blended logits.
        dtype: ``"uint8"``, ``"float16"`` or ``"float32"``.
    """
    p = torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))).numpy()
    if dtype == "uint8":
        return np.rint(p * 255.0).astype(np.uint8)
    return p.astype(dtype)


class ProbabilityWriter:
    """Writes a probability map beside the mask, from the same blocks, in a second thread.

    The mask writer pulls blocks from the predictor; each block's logits are handed over here
    (:meth:`put`) and written by :func:`lsmseg.io.write_mask_blocks` in this writer's thread, so
    both files stream block by block and the logits are computed once. Atomic like the mask: an
    error on either side removes the partial probability file.
    """

    _DONE, _ABORT = object(), object()

    def __init__(self, path: Path, volume: Volume, dtype: str = "uint8"):
        """Start the writer thread.

        Args:
            path: the probability map (its suffix picks the format, as for masks).
            volume: the input volume (shape and container metadata).
            dtype: ``"uint8"`` (p = value / 255) or ``"float16"``.
        """
        self.path = path
        # SimpleITK (NIfTI, MHA, NRRD) has no 16-bit float: those files get float32.
        self.dtype = "float32" if dtype == "float16" and mask_format_for(path) == "sitk" else dtype
        self.queue: "queue.Queue" = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.finished = False  # renamed into place
        self.thread = threading.Thread(target=self._write, args=(volume,), daemon=True)
        self.thread.start()

    def _blocks(self):
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if item is self._ABORT:
                raise RuntimeError("mask failed: probability map discarded")
            yield item

    def _write(self, volume: Volume) -> None:
        try:
            write_mask_blocks(self._blocks(), self.path, volume.shape, like=volume, dtype=np.dtype(self.dtype))
        except BaseException as exc:  # reported by put/finish in the predicting thread
            self.error = exc

    def _hand_over(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise self.error or RuntimeError(f"{self.path}: probability writer stopped")

    def put(self, out, logits: np.ndarray) -> None:
        """Hand one block's logits (at ``out`` in the volume) to the writer."""
        self._hand_over((out, probability_blocks(logits, self.dtype)))

    def finish(self) -> None:
        """Wait until the probability map is complete and renamed into place."""
        self._hand_over(self._DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.finished = True

    def abort(self) -> None:
        """The mask failed: remove the probability map, partial or (when the mask failed after
        :meth:`finish`) complete, so that a failed volume leaves neither file."""
        if self.thread.is_alive():
            with contextlib.suppress(BaseException):
                self._hand_over(self._ABORT)
            self.thread.join()
        if self.finished:
            remove_output(self.path)

    def describe(self) -> dict:
        scale = "p = value / 255" if self.dtype == "uint8" else "p = value"
        return {"path": str(self.path), "dtype": self.dtype, "scale": scale}
