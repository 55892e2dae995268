"""PyTorch variants on one 64x128x128 window of the shipped network, same process, interleaved: fp32,
channels-last 3-D, int8 dynamic quantisation of the Linear layers. Prints times and mask changes.

    python benchmarks/engines_torch_variants.py weights
"""
import sys, time
from pathlib import Path; _here = Path(__file__).resolve().parent; sys.path.insert(0, str(_here.parent / "src")); sys.path.insert(0, str(_here))
if sys.argv[1:2] in (["-h"], ["--help"]):  # not a weights folder: print the usage, not a WeightsError
    print(__doc__.strip()); sys.exit(0)
import torch
from _common import model_and_config
torch.set_num_threads(2)
model, cfg, s, _ = model_and_config(sys.argv[1] if len(sys.argv) > 1 else "weights")
x = torch.randn(1, 1, 64, 128, 128)
variants = {"fp32": model}
cl = model_and_config(sys.argv[1] if len(sys.argv) > 1 else "weights")[0].to(memory_format=torch.channels_last_3d)
variants["channels_last"] = cl
q = torch.ao.quantization.quantize_dynamic(model_and_config(sys.argv[1] if len(sys.argv) > 1 else "weights")[0], {torch.nn.Linear}, dtype=torch.qint8)
variants["int8_linear"] = q
outs = {}
with torch.inference_mode():
    for k, m in variants.items():
        xi = x.to(memory_format=torch.channels_last_3d) if k == "channels_last" else x
        outs[k] = m(xi)
    times = {k: [] for k in variants}
    for rep in range(2):
        for k, m in variants.items():
            xi = x.to(memory_format=torch.channels_last_3d) if k == "channels_last" else x
            t = time.perf_counter(); m(xi); times[k].append(round(time.perf_counter() - t, 2))
for k in variants:
    d = (outs[k] - outs["fp32"]).abs().max().item()
    sign = ((outs[k] > 1.0986) != (outs["fp32"] > 1.0986)).float().mean().item()
    print(k, times[k], "maxdiff", round(d, 5), "mask change frac", sign)
