"""ONNX Runtime against PyTorch on one batch of 4 windows of the shipped network, same process, interleaved.

    python benchmarks/engines_onnx_check.py weights     # prints export time, max |difference|, times
"""
import sys, time
from pathlib import Path; _here = Path(__file__).resolve().parent; sys.path.insert(0, str(_here.parent / "src")); sys.path.insert(0, str(_here))
if sys.argv[1:2] in (["-h"], ["--help"]):  # not a weights folder: print the usage, not a WeightsError
    print(__doc__.strip()); sys.exit(0)
import numpy as np, torch
from _common import model_and_config
torch.set_num_threads(2)
model, cfg, s, _ = model_and_config(sys.argv[1] if len(sys.argv) > 1 else "weights")
x = torch.randn(4, 1, 32, 64, 64)
t = time.perf_counter()
torch.onnx.export(model, (x,), "/tmp/lsmseg_swin_check.onnx", opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
print("export", round(time.perf_counter() - t, 1), flush=True)
import onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
sess = ort.InferenceSession("/tmp/lsmseg_swin_check.onnx", so, providers=["CPUExecutionProvider"])
xn = x.numpy()
with torch.inference_mode():
    ref = model(x).numpy()
out = sess.run(None, {"x": xn})[0]
print("maxdiff", float(np.abs(out - ref).max()), "mask change", float(((out > 1.0986) != (ref > 1.0986)).mean()), flush=True)
tt, to = [], []
for rep in range(2):
    with torch.inference_mode():
        t = time.perf_counter(); model(x); tt.append(round(time.perf_counter() - t, 2))
    t = time.perf_counter(); sess.run(None, {"x": xn}); to.append(round(time.perf_counter() - t, 2))
    print("torch", tt, "ort", to, flush=True)
