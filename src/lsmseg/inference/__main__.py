"""``python -m lsmseg.inference [MANIFEST]``: export every model of the installed (or named) manifest
to ONNX now (the file OpenVINO and ONNX Runtime both run), for its training window (the default
inference window), into the cache (``LSMSEG_CACHE_DIR``), e.g. while building an image, so that no
run pays it. Prints the files. Needs one of the two engines installed."""

import logging
import sys

from ..weights import load_manifest, resolve_manifest
from .engines import installed_exported_engine
from .predictor import Predictor, RunOptions

logging.basicConfig(level=logging.INFO, format="%(message)s")
manifest = resolve_manifest(sys.argv[1] if len(sys.argv) > 1 else None)
# Either engine writes the same export; with neither installed, onnxruntime's error names the extras.
engine = installed_exported_engine() or "onnxruntime"
for name in load_manifest(manifest).models:
    options = RunOptions(structure=name, progress=False)
    print(Predictor.from_manifest(manifest, device="cpu", engine=engine, options=options).export_engine())
