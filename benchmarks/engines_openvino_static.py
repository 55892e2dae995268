"""OpenVINO with a static input shape against the dynamic batch lsmseg uses, and what a compiled
model costs to make or to import.

    python benchmarks/engines_openvino_static.py weights [--reps 15] [--threads 2] [--volume TIF]

The shipped network's ONNX export (``python -m lsmseg.inference weights`` caches it) compiled four
ways in one process, each on one stream of all threads (``OpenVinoEngine`` before 2026-12-03; it now
splits batches across two streams: engines_openvino_streams.py): as exported (batch dimension
dynamic, what ``OpenVinoEngine`` runs), reshaped
to a static batch of 4 windows (``sw_batch_size``), and each of those with OpenVINO's
``CPU_DENORMALS_OPTIMIZATION`` (denormals flushed to zero). Per batch of 4 training-size windows:
the time of each, interleaved, median of ``--reps``, and the largest logit difference from the
dynamic model. The windows are random, or with ``--volume`` the first four windows of that volume
normalised as lsmseg does (real input, whose activations may reach denormals where random input
does not). Then, each in a fresh process: compiling from the ONNX file, and importing the compiled
model from its exported bytes (what lsmseg's compiled-model cache does); ``--no-compile`` skips it.
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


def compiled_models(onnx: Path, window: tuple[int, ...], threads: int) -> dict:
    """The four compiled models, by name: dynamic and static batch, without and with denormals flushed."""
    from lsmseg.inference.engines import openvino_config, openvino_core

    core, compiled = openvino_core(), {}
    for denormals in (False, True):
        config = {**openvino_config(threads), "NUM_STREAMS": 1,
                  **({"CPU_DENORMALS_OPTIMIZATION": True} if denormals else {})}
        for static in (False, True):
            model = core.read_model(str(onnx))
            if static:
                model.reshape([BATCH, 1, *window])
            name = ("static" if static else "dynamic") + (" + denormals flushed" if denormals else "")
            compiled[name] = core.compile_model(model, "CPU", config)
    return compiled


def real_windows(predictor, path: Path, window: tuple[int, ...], count: int = BATCH) -> np.ndarray:
    """The first ``count`` windows of the volume at ``path`` (scan order, stride half a window),
    normalised as lsmseg normalises it, edge-padded where the volume is thinner than a window."""
    from lsmseg import io

    normalised = predictor.normalised(io.read_volume(path).load(), name=str(path))
    normalised = np.pad(normalised, [(0, max(0, w - s)) for w, s in zip(window, normalised.shape)], mode="edge")
    corners = [(z, y, x) for z in range(0, normalised.shape[0] - window[0] + 1, window[0] // 2)
               for y in range(0, normalised.shape[1] - window[1] + 1, window[1] // 2)
               for x in range(0, normalised.shape[2] - window[2] + 1, window[2] // 2)][:count]
    if len(corners) < count:
        raise SystemExit(f"{path}: fewer than {count} windows of {window}")
    return np.stack([normalised[z:z + window[0], y:y + window[1], x:x + window[2]] for z, y, x in corners])[:, None]


def child(spec: dict) -> dict:
    """Compile (``blob`` absent) or import (``blob`` present) one kind in this fresh process."""
    from lsmseg.inference.engines import openvino_config, openvino_core

    core, config = openvino_core(), {**openvino_config(spec["threads"]), "NUM_STREAMS": 1}
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
    parser.add_argument("--volume", type=Path, help="take the windows from this volume (default: random)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile / import timings")
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
    compiled = compiled_models(onnx, window, args.threads)
    if args.volume:
        batch = np.ascontiguousarray(real_windows(predictor, args.volume, window), dtype=np.float32)
    else:
        batch = np.random.default_rng(0).random((BATCH, 1, *window), dtype=np.float32)
    reference = compiled["dynamic"](batch, share_outputs=False)[0]
    times = {name: [] for name in compiled}
    for _ in range(args.reps):
        for name, model in compiled.items():
            start = time.perf_counter()
            model(batch, share_outputs=False)
            times[name].append(time.perf_counter() - start)
    print(f"window {window}, batch {BATCH}, {args.threads} threads, median of {args.reps} (interleaved); "
          f"windows: {args.volume or 'random'}")
    base = statistics.median(times["dynamic"])
    for name, model in compiled.items():
        seconds = statistics.median(times[name])
        difference = float(np.abs(model(batch, share_outputs=False)[0] - reference).max())
        print(f"  {name}: {seconds:.3f} s per batch ({base / seconds:.3f}x dynamic; quartiles "
              f"{np.percentile(times[name], 25):.3f}-{np.percentile(times[name], 75):.3f}); "
              f"largest logit difference {difference:.2g}")
    del compiled
    if args.no_compile:
        return 0

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
