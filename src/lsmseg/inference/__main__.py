"""``python -m lsmseg.inference [MANIFEST]``: export every model of the installed (or named) manifest
for ONNX Runtime now, for its training window (the default inference window), into the cache
(``LSMSEG_CACHE_DIR``), e.g. while building an image, so that no run pays it. Prints the files."""

import logging
import sys

from ..weights import load_manifest, resolve_manifest
from .predictor import Predictor, RunOptions

logging.basicConfig(level=logging.INFO, format="%(message)s")
manifest = resolve_manifest(sys.argv[1] if len(sys.argv) > 1 else None)
for name in load_manifest(manifest).models:
    options = RunOptions(structure=name, progress=False)
    print(Predictor.from_manifest(manifest, device="cpu", engine="onnxruntime", options=options).export_engine())
