"""ONNX Runtime's CPU memory arena on and off: peak RSS and time of one prediction (benchmarks/README.md).

    python benchmarks/engines_onnx_memory.py on|off [drop] [VOLUME]

``drop`` releases the PyTorch model after the ONNX export. Run each setting in its own process
(peak RSS is the process's). Default volume: the DELiVR c-Fos patch 1147_0 (validation split).
"""

import gc
import resource
import sys
import time
from pathlib import Path

# Checked before the slow imports: an unknown first word used to run the "off" setting (--help a
# 30-second measurement), and no word at all an IndexError.
if len(sys.argv) < 2 or sys.argv[1] not in ("on", "off"):
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    print(f"usage: {Path(__file__).name} on|off [drop] [VOLUME] (the ONNX Runtime arena setting comes first)",
          file=sys.stderr)
    sys.exit(2)

import onnxruntime
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_DATA  # noqa: E402

arena = sys.argv[1] == "on"
drop = "drop" in sys.argv[2:]
volume = next((a for a in sys.argv[2:] if a != "drop"), str(REAL_DATA / "delivr/cfos/images/patchvolume_1147_0.tif"))


class Options(onnxruntime.SessionOptions):
    """The engine's session options, with the arena switched as asked."""

    def __init__(self):
        super().__init__()
        self.enable_cpu_mem_arena = arena


onnxruntime.SessionOptions = Options  # read by lsmseg.inference.engines at session creation
torch.set_num_threads(2)
from lsmseg import io  # noqa: E402
from lsmseg.inference import Predictor, RunOptions  # noqa: E402

predictor = Predictor.from_manifest(REPO / "weights", device="cpu", engine="onnxruntime", options=RunOptions(progress=False))
predictor.export_engine()
if drop:
    predictor.model = None
    gc.collect()
image = io.read_volume(volume).load()
start = time.time()
mask = predictor.predict_volume(image)
print(f"arena {'on' if arena else 'off'}{', model dropped' if drop else ''}: {time.time() - start:.1f} s, "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB, mask voxels {int(mask.sum())}")
