"""OpenVINO against ONNX Runtime on the shipped network's ONNX export, end to end through ``Predictor``.

    python benchmarks/engines_openvino.py weights [--reps 3] [--threads 2] [--volumes cfos_neuron,microglia]

Both engines run the same cached export (``python -m lsmseg.inference weights`` fills it). Each
predicts the validation volumes of ``engines_onnx_int8.py`` through the unchanged ``Predictor``
(one pass, no per-structure clean-up), interleaved, after a warm-up that compiles its model:
wall time per volume (median of ``--reps``), the largest logit difference, and the share of voxels
whose mask changes at each structure's threshold. Peak memory needs a process per engine:
``bench_seed.py`` measures it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines_onnx_int8 import VOLUMES, read_volume_cropped  # noqa: E402

from lsmseg.argtypes import positive_int  # noqa: E402

ENGINES = ("onnxruntime", "openvino")


def structure_list(text: str) -> set[str]:
    """An argparse type: structures among :data:`VOLUMES`', comma-separated."""
    known = [s for _, s, _ in VOLUMES]
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(known))
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(known)}, got {text!r}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="weights", help="weights folder or manifest")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed runs per engine and volume (median)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch and engine threads")
    parser.add_argument("--volumes", type=structure_list, default=None,
                        help=f"comma-separated structures of the volumes to run (default all: "
                             f"{','.join(s for _, s, _ in VOLUMES)})")
    args = parser.parse_args(argv)
    volumes = [v for v in VOLUMES if args.volumes is None or v[1] in args.volumes]

    import torch

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.inference.predictor import logit

    torch.set_num_threads(args.threads)
    predictors = {name: Predictor.from_manifest(args.weights, engine=name, options=RunOptions(progress=False))
                  for name in ENGINES}
    manifest_settings = predictors["onnxruntime"].settings  # each structure's threshold is read from these
    for predictor in predictors.values():
        predictor.settings = dataclasses.replace(manifest_settings, per_structure={}, mirror_axes=())
        predictor.export_engine()
    rows = []
    for relative, structure, crop in volumes:
        image, volume = read_volume_cropped(relative, crop)
        threshold = manifest_settings.for_structure(structure).threshold
        logit_threshold = logit(threshold)
        times = {name: [] for name in ENGINES}
        logits = {}
        for rep in range(args.reps):
            for name, predictor in predictors.items():
                predictor.predict_logits(image[:8, :64, :64], name="warm-up")
                start = time.perf_counter()
                logits[name] = predictor.predict_logits(image, name=Path(relative).stem)
                times[name].append(time.perf_counter() - start)
        changed = float(((logits["openvino"] >= logit_threshold) != (logits["onnxruntime"] >= logit_threshold)).mean())
        row = {"volume": volume,
               **{f"{name}_wall_s": round(statistics.median(times[name]), 2) for name in ENGINES},
               "openvino_speed_vs_onnxruntime": round(statistics.median(times["onnxruntime"])
                                                      / statistics.median(times["openvino"]), 2),
               "max_abs_logit_diff": round(float(np.abs(logits["openvino"] - logits["onnxruntime"]).max()), 6),
               "threshold": threshold, "mask_voxels_changed_pct": round(100 * changed, 5)}
        rows.append(row)
        print(row, flush=True)
    print(f"\n| volume | ONNX Runtime wall (s), median of {args.reps} | OpenVINO wall (s) | OpenVINO's speed "
          "| max abs logit difference | threshold | voxels changing side (%) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['onnxruntime_wall_s']} | {r['openvino_wall_s']} | "
              f"{r['openvino_speed_vs_onnxruntime']}x | {r['max_abs_logit_diff']} | {r['threshold']} "
              f"| {r['mask_voxels_changed_pct']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
