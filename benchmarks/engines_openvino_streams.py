"""OpenVINO CPU streams: a batch of windows run whole on one stream of all threads, against the
batch split across several streams (infer requests side by side, each on a share of the threads),
which is what ``OpenVinoEngine`` does from two threads on (``engines.openvino_streams``).

    python benchmarks/engines_openvino_streams.py weights [--threads 2] [--streams 1,2] [--reps 15]
        [--volume TIF]

The shipped network's ONNX export (``python -m lsmseg.inference weights`` caches it) compiled once
per stream count, all with lsmseg's settings (``engines.openvino_config``) but ``NUM_STREAMS``. Each
repetition runs the same 16 windows as 4 batches of ``sw_batch_size`` 4, every stream count in turn
(interleaved); printed: the median time per window, its speed against one stream, and the largest
logit difference from one stream. The windows are the first 16 of ``--volume`` (default: a
validation c-Fos patch), normalised as lsmseg does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import engines_openvino_static  # noqa: E402  (real_windows)

BATCH, WINDOWS = 4, 16
DEFAULT_VOLUME = "delivr/cfos/images/patchvolume_1147_0.tif"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,2", help="stream counts to compare, comma-separated (1 first)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--volume", type=Path, help=f"default: $LSMSEG_DATA/{DEFAULT_VOLUME}")
    args = parser.parse_args(argv)
    counts = [int(s) for s in args.streams.split(",")]
    if counts[0] != 1:
        raise SystemExit("--streams must start with 1 (the reference)")
    volume = args.volume or Path(os.environ.get("LSMSEG_DATA", "../shared/data/real")) / DEFAULT_VOLUME

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.inference.engines import openvino_config, openvino_core, run_split
    from lsmseg.weights import resolve_manifest

    predictor = Predictor.from_manifest(resolve_manifest(args.weights), device="cpu", engine="openvino",
                                        options=RunOptions(progress=False))
    window = tuple(predictor.roi)
    onnx = predictor.export_engine()
    windows = np.ascontiguousarray(engines_openvino_static.real_windows(predictor, volume, window, WINDOWS),
                                   dtype=np.float32)
    batches = [windows[i:i + BATCH] for i in range(0, WINDOWS, BATCH)]
    core, requests = openvino_core(), {}
    for n in counts:
        compiled = core.compile_model(str(onnx), "CPU", {**openvino_config(args.threads), "NUM_STREAMS": n})
        requests[n] = [compiled.create_infer_request() for _ in range(n)]
    reference = np.concatenate([run_split(requests[1], b).copy() for b in batches])
    times = {n: [] for n in counts}
    for _ in range(args.reps):
        for n in counts:
            start = time.perf_counter()
            for b in batches:
                run_split(requests[n], b)
            times[n].append((time.perf_counter() - start) / WINDOWS)
    print(f"window {window}, batches of {BATCH}, {args.threads} threads, {WINDOWS} windows of {volume.name}, "
          f"median of {args.reps} (interleaved); machine: {os.cpu_count()} CPUs")
    base = statistics.median(times[1])
    for n in counts:
        got = np.concatenate([run_split(requests[n], b).copy() for b in batches])
        seconds = statistics.median(times[n])
        print(f"  {n} stream(s): {seconds * 1e3:.1f} ms per window ({base / seconds:.3f}x one stream; quartiles "
              f"{np.percentile(times[n], 25) * 1e3:.1f}-{np.percentile(times[n], 75) * 1e3:.1f}); "
              f"largest logit difference {float(np.abs(got - reference).max()):.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
