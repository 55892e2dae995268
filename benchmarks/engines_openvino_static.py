"""OpenVINO with a static input shape against the dynamic batch lsmseg uses, and what a compiled
model costs to make or to import.

    python benchmarks/engines_openvino_static.py weights [--reps 15] [--threads 2]

The shipped network's ONNX export (``python -m lsmseg.inference weights`` caches it) compiled twice
in one process: as exported (batch dimension dynamic, what ``OpenVinoEngine`` runs) and reshaped to
a static batch of 4 windows (``sw_batch_size``). Per batch of 4 training-size windows: the time of
each, interleaved, median of ``--reps``, and the largest logit difference. Then, each in a fresh
process: compiling from the ONNX file, and importing the compiled model from its exported bytes
(what lsmseg's compiled-model cache does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 4


def compiled_models(onnx: Path, window: tuple[int, ...], threads: int):
    from lsmseg.inference.engines import openvino_config, openvino_core

    core, config = openvino_core(), openvino_config(threads)
    dynamic = core.compile_model(str(onnx), "CPU", config)
    model = core.read_model(str(onnx))
    model.reshape([BATCH, 1, *window])
    return dynamic, core.compile_model(model, "CPU", config)


def child(spec: dict) -> dict:
    """Compile (``blob`` absent) or import (``blob`` present) one kind in this fresh process."""
    from lsmseg.inference.engines import openvino_config, openvino_core

    core, config = openvino_core(), openvino_config(spec["threads"])
    blob = Path(spec["blob"])
    start = time.perf_counter()
    if blob.is_file():
        core.import_model(blob.read_bytes(), "CPU", config)
        return {"import_s": time.perf_counter() - start}
    if spec["static"]:
        model = core.read_model(spec["onnx"])
        model.reshape([BATCH, 1, *spec["window"]])
        compiled = core.compile_model(model, "CPU", config)
    else:
        compiled = core.compile_model(spec["onnx"], "CPU", config)
    seconds = time.perf_counter() - start
    blob.write_bytes(compiled.export_model().getvalue())
    return {"compile_s": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="weights")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.weights import resolve_manifest

    predictor = Predictor.from_manifest(resolve_manifest(args.weights), device="cpu", engine="openvino",
                                        options=RunOptions(progress=False))
    window = tuple(predictor.roi)
    onnx = predictor.export_engine()
    dynamic, static = compiled_models(onnx, window, args.threads)
    batch = np.random.default_rng(0).random((BATCH, 1, *window), dtype=np.float32)
    difference = float(np.abs(dynamic(batch, share_outputs=False)[0] - static(batch, share_outputs=False)[0]).max())
    times = {"dynamic": [], "static": []}
    for _ in range(args.reps):
        for kind, compiled in (("dynamic", dynamic), ("static", static)):
            start = time.perf_counter()
            compiled(batch, share_outputs=False)
            times[kind].append(time.perf_counter() - start)
    del dynamic, static
    per_batch = {kind: statistics.median(values) for kind, values in times.items()}
    print(f"window {window}, batch {BATCH}, {args.threads} threads, median of {args.reps} (interleaved)")
    print(f"  per batch: dynamic {per_batch['dynamic']:.3f} s, static {per_batch['static']:.3f} s "
          f"({per_batch['dynamic'] / per_batch['static']:.3f}x); largest logit difference {difference:.2g}")

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dynamic", "static"):
            spec = {"onnx": str(onnx), "window": list(window), "threads": args.threads, "static": kind == "static",
                    "blob": str(Path(tmp) / f"{kind}.blob")}
            results = [json.loads(subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]) for _ in range(3)]
            print(f"  {kind}: compile {results[0]['compile_s']:.2f} s (fresh process), import of the compiled "
                  f"model {results[1]['import_s']:.2f} / {results[2]['import_s']:.2f} s "
                  f"({Path(spec['blob']).stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
