"""``python -m lsmseg.inference [MANIFEST]``: export the installed (or named) weights for ONNX Runtime
now, into the cache (``LSMSEG_CACHE_DIR``), e.g. while building an image, so that no run pays it."""

import logging
import sys

from .predictor import Predictor, RunOptions

logging.basicConfig(level=logging.INFO, format="%(message)s")
predictor = Predictor.from_manifest(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu", engine="onnxruntime",
                                    options=RunOptions(progress=False))
print(predictor.export_engine())
