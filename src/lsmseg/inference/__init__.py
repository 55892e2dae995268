"""Inference: a trained model applied to volumes of any size, block by block.

=================  =============================================================================
module             owns
=================  =============================================================================
``windows``        MONAI's window grid, padding and Gaussian blending weights
``blocks``         output blocks over the global window grid; blending of one block's windows
``foreground``     background skipping: which windows are uniformly dark (a prior, see there)
``postprocess``    threshold clean-up: small components, splitting of touching objects
``engines``        PyTorch or ONNX Runtime for the network on CPU
``probabilities``  probability maps written beside the masks
``results``        typed results: :class:`BlockStats`, :class:`VolumeResult`, the provenance record
``predictor``      :class:`Predictor` (model + settings) on arrays and blocks; its :class:`RunOptions`
``run``            the run API for files: :func:`predict_file`, :func:`predict_files` -> :class:`VolumeResult`
=================  =============================================================================

This package never imports the training or evaluation packages (tests/unit/test_layout.py).
"""

from .predictor import PreparedVolume, Predictor, RunOptions
from .results import BlockStats, VolumeResult
from .run import predict_file, predict_files

__all__ = ["BlockStats", "PreparedVolume", "Predictor", "RunOptions", "VolumeResult", "predict_file", "predict_files"]
