"""ONNX Runtime int8 (dynamic quantisation) against the fp32 export of the shipped network, end to end.

    python benchmarks/engines_onnx_int8.py weights [--reps 3] [--threads 2]

The shipped network's cached ONNX export (``python -m lsmseg.inference weights`` fills it) is
quantised with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantised
per batch at run time) for two operator sets: the matrix products only (attention and MLP) and the
matrix products plus the convolutions. Each variant predicts the same validation volumes through
the unchanged ``Predictor`` (its cache folder pointed at the variant's file), interleaved, and is
compared with fp32: wall time per volume (median of ``--reps``), the largest logit difference, and
the share of voxels whose mask changes at each structure's threshold. Validation volumes (c-Fos
1147_0, microglia 7466_1, vesselNN poon2015 central crop) because a kept variant would be a choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_DATA  # noqa: E402

VOLUMES = (  # (file below the real data, structure whose manifest threshold applies, central yx crop)
    ("delivr/cfos/images/patchvolume_1147_0.tif", "cfos_neuron", None),
    ("delivr/microglia/images/patchvolume_7466_1.tif", "microglia", None),
    ("vesselnn/images/poon2015_BBB_Leakage.tif", "blood_vessel", 160),
)


def read_volume_cropped(relative: str, crop: int | None):
    """A volume of :data:`VOLUMES`, cut to its central ``crop`` x ``crop`` columns when one is given,
    and its name for the tables."""
    from lsmseg.io import read_volume

    image = read_volume(REAL_DATA / relative).load()
    if crop:
        y0, x0 = (image.shape[1] - crop) // 2, (image.shape[2] - crop) // 2
        image = image[:, y0:y0 + crop, x0:x0 + crop]
    return image, Path(relative).stem + (f" (central {crop}x{crop})" if crop else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="weights")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--structures", nargs="+", default=[v[1] for v in VOLUMES],
                        help="only the volumes of these structures (default: all three)")
    args = parser.parse_args(argv)

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.inference.engines import cache_dir
    from lsmseg.inference.predictor import logit

    torch.set_num_threads(args.threads)
    predictor = Predictor.from_manifest(args.weights, engine="onnxruntime", options=RunOptions(progress=False))
    manifest_settings = predictor.settings  # each structure's threshold is read from these
    # One pass, no per-structure clean-up: the engines' logits are compared, at each structure's threshold.
    predictor.settings = dataclasses.replace(manifest_settings, per_structure={}, mirror_axes=())
    fp32 = predictor.export_engine()
    work = Path(tempfile.mkdtemp(prefix="lsmseg-int8-"))
    caches = {"fp32": fp32.parent.parent}
    for name, ops in (("int8 MatMul", ["MatMul"]), ("int8 MatMul+Conv", ["MatMul", "Conv"])):
        folder = work / name.replace(" ", "_").replace("+", "_") / "onnx"
        folder.mkdir(parents=True)
        start = time.perf_counter()
        quantize_dynamic(fp32, folder / fp32.name, op_types_to_quantize=ops, weight_type=QuantType.QInt8)
        print(f"{name}: quantised in {time.perf_counter() - start:.1f} s, "
              f"{(folder / fp32.name).stat().st_size / 1e6:.1f} MB (fp32 {fp32.stat().st_size / 1e6:.1f} MB)", flush=True)
        caches[name] = folder.parent

    rows = []
    for relative, structure, crop in (v for v in VOLUMES if v[1] in args.structures):
        image, volume = read_volume_cropped(relative, crop)
        threshold = manifest_settings.for_structure(structure).threshold
        logit_threshold = logit(threshold)
        times = {name: [] for name in caches}
        logits = {}
        for rep in range(args.reps):
            for name, cache in caches.items():
                os.environ["LSMSEG_CACHE_DIR"] = str(cache)
                assert cache_dir() == cache
                predictor._onnx._sessions.clear()  # a fresh session on this variant's file
                predictor.predict_logits(image[:8, :64, :64], name="warm-up")
                start = time.perf_counter()
                logits[name] = predictor.predict_logits(image, name=Path(relative).stem)
                times[name].append(time.perf_counter() - start)
        for name in caches:
            difference = float(np.abs(logits[name] - logits["fp32"]).max())
            changed = float(((logits[name] >= logit_threshold) != (logits["fp32"] >= logit_threshold)).mean())
            row = {"volume": volume, "variant": name,
                   "wall_s": round(statistics.median(times[name]), 2),
                   "speed_vs_fp32": round(statistics.median(times["fp32"]) / statistics.median(times[name]), 2),
                   "max_abs_logit_diff": round(difference, 4), "threshold": threshold,
                   "mask_voxels_changed_pct": round(100 * changed, 4)}
            rows.append(row)
            print(row, flush=True)
    print("\n| volume | variant | wall (s), median of", args.reps, "| speed vs fp32 | max abs logit difference "
          "| threshold | voxels changing side (%) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['variant']} | {r['wall_s']} | {r['speed_vs_fp32']}x | {r['max_abs_logit_diff']} "
              f"| {r['threshold']} | {r['mask_voxels_changed_pct']} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
