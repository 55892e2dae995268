"""How long `lsmseg evaluate` takes on SELMA3D-2026-sized cases (200^3, thousands of cells).

    python benchmarks/bench_evaluation.py [--cases 4] [--jobs 2] [--size 200]

Not a test: nothing here asserts a speed. Builds ``--cases`` dense cell patches (label: ~3000
26-connected blobs; prediction: the same blobs shifted, some dropped, some merged, speckle added),
writes them as TIFF and times, in this one process tree:

1. panoptica's PQ alone (the 2026 evaluator's ``Panoptica_Evaluator`` call) per case;
2. the leaderboard values alone (Dice + PQ, what the organisers compute) per case;
3. ``evaluate_folders`` with every extra metric (HD95, clDice, Betti numbers, no figures) with
   ``--jobs 1`` and with ``--jobs N``, wall time for all cases;

and extrapolates to the 96 cases of the 2026 final test. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "evaluation", "training"):
    sys.path.insert(0, str(REPO / folder))


def cell_patch(seed: int, size: int, cells: int):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    seeds = np.zeros(shape, bool)
    centres = rng.integers(3, size - 3, size=(cells, 3))
    seeds[tuple(centres.T)] = True
    label = ndimage.binary_dilation(seeds, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    keep = rng.random(cells) > 0.1  # 10 % of the cells missed
    moved = np.zeros(shape, bool)
    shifts = rng.integers(-1, 2, size=(cells, 3))
    kept = np.clip(centres[keep] + shifts[keep], 0, size - 1)
    moved[tuple(kept.T)] = True
    pred = ndimage.binary_dilation(moved, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    pred |= rng.random(shape) > 0.9995  # speckle: single-voxel false positives
    return pred.astype(np.uint8), label.astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--cells", type=int, default=4000, help="cell seeds per patch")
    args = parser.parse_args(argv)

    import cc3d

    from lsmseg.io import write_volume
    from lsmseg_evaluation.evaluate import EvaluationSettings, evaluate_folders
    from lsmseg_evaluation.leaderboard import dice, panoptica_pq

    tiny = np.zeros((8, 8, 8), np.uint8)
    tiny[2:4, 2:4, 2:4] = 1
    panoptica_pq(tiny, tiny)  # imports and first-call set-up stay out of the timings
    with tempfile.TemporaryDirectory(prefix="lsmseg-bench-eval-") as scratch:
        scratch = Path(scratch)
        components, pq_seconds, lb_seconds = [], [], []
        for i in range(args.cases):
            pred, label = cell_patch(i, args.size, args.cells)
            name = f"cfos_neuron_bench_{i}"
            write_volume(label, scratch / "labels" / f"{name}.tif")
            write_volume(pred, scratch / "pred" / f"{name}.tif")
            components.append((cc3d.connected_components(label, return_N=True)[1],
                               cc3d.connected_components(pred, return_N=True)[1], float(label.mean())))
            start = time.perf_counter()
            pq = panoptica_pq(pred, label)
            pq_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            dice(pred, label)
            lb_seconds.append(time.perf_counter() - start + pq_seconds[-1])
            print(f"case {i}: {components[-1][0]} label / {components[-1][1]} predicted components, "
                  f"PQ {pq:.4f} in {pq_seconds[-1]:.2f} s", flush=True)
        walls = {}
        for jobs in sorted({1, args.jobs}):
            settings = EvaluationSettings(preset="selma3d-2026", jobs=jobs, figures=False, progress=False)
            start = time.perf_counter()
            result = evaluate_folders(scratch / "pred", scratch / "labels", None, settings)
            walls[jobs] = time.perf_counter() - start
            assert not result.failed, result.failed
            print(f"evaluate_folders --jobs {jobs}: {walls[jobs]:.1f} s for {args.cases} cases", flush=True)

    n = args.cases
    mean_components = np.mean([c[0] for c in components])
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s) "
          f"(load average {os.getloadavg()[0]:.1f} at the end), panoptica 2.1.7\n")
    print(f"{n} cases of {args.size}^3 voxels, {mean_components:.0f} label components on average, "
          f"{100 * np.mean([c[2] for c in components]):.1f} % foreground.\n")
    print("| what | per case (mean) | 96 cases, extrapolated |")
    print("|---|---|---|")
    print(f"| panoptica PQ alone | {np.mean(pq_seconds):.2f} s | {96 * np.mean(pq_seconds) / 60:.1f} min |")
    print(f"| leaderboard values (Dice + PQ) | {np.mean(lb_seconds):.2f} s | {96 * np.mean(lb_seconds) / 60:.1f} min |")
    for jobs, wall in walls.items():
        print(f"| evaluate, all metrics, read + score, --jobs {jobs} | {wall / n:.2f} s (wall / cases) | "
              f"{96 * wall / n / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
