"""How many windows block-wise prediction runs, against the volume's distinct windows: blocks aligned
to the window grid or not, with the window cache of each size (no network runs: the plan alone).

    python benchmarks/window_reuse.py [--shapes 1000,2000,2000 500,1000,1000 256,512,512]

A window straddling block borders runs once per block it touches without the cache. The cache
(:class:`lsmseg.inference.blocks.WindowCache`) keeps its output for the later blocks up to its cap;
this replays the predictor's order (blocks z-major, windows in scan order, get / put / release as
``accumulate_block`` calls them) with placeholder entries the size
of the part of a 32x64x64 float32 window the cache keeps (``BlockPlan.part_beyond``; 512 KiB for a
whole window), and reports the windows run and the cache's peak size.
Skipped dark windows are left out (none here): they run in no block.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

ROI = (32, 64, 64)
OVERLAP = 0.5


class Placeholder:
    """Stands for the part of a window's weighted logits the cache keeps: its size, nothing else."""

    def __init__(self, part):
        self.nbytes = 4 * math.prod(s.stop - s.start for s in part)

    def clone(self):
        return self


def replay(shape, block, cap_bytes: int) -> dict:
    """Windows run and the cache's peak bytes for ``shape`` cut into ``block``, cache capped at ``cap_bytes``."""
    from lsmseg.inference.blocks import WindowCache, plan_blocks

    plan = plan_blocks(shape, ROI, OVERLAP, block)
    cache = WindowCache(plan, cap_bytes)
    runs = peak = 0
    for b in plan.blocks:
        ids = plan.window_ids(b)
        for i, corner in zip(ids, plan.window_corners(b)):
            if cache.get(i) is None:
                runs += 1
                if cache.wants(i):
                    cache.put(i, Placeholder(plan.part_beyond(b, corner)))
        peak = max(peak, cache.bytes)
        cache.release(ids)
    return {"blocks": len(plan.blocks), "windows": plan.n_windows, "runs": runs, "peak": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1000,2000,2000", "500,1000,1000", "256,512,512"])
    parser.add_argument("--caps-mb", default="0,512,1024,2048,100000", help="cache caps to replay (MB)")
    args = parser.parse_args(argv)
    from lsmseg.inference.blocks import default_block_shape, grid_stride

    rows = []
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split(","))
        for aligned in (False, True):
            block = default_block_shape(shape, stride=grid_stride(ROI, OVERLAP) if aligned else None)
            for cap in (int(c) for c in args.caps_mb.split(",")):
                result = replay(shape, block, cap << 20)
                rows.append({"shape": "x".join(map(str, shape)), "block": "x".join(map(str, block)),
                             "aligned": "yes" if aligned else "no", "blocks": result["blocks"],
                             "cap": cap, "windows": result["windows"], "runs": result["runs"],
                             "ratio": result["runs"] / result["windows"], "peak": result["peak"] / 2 ** 20})
    print(f"windows {ROI}, overlap {OVERLAP}; default blocks (at most 256^3 voxels)\n")
    print(table(rows, [("shape", "volume", ""), ("block", "block", ""), ("aligned", "on the grid", ""),
                       ("blocks", "blocks", ""), ("cap", "cache cap (MB)", ""), ("windows", "windows", ""),
                       ("runs", "windows run", ""), ("ratio", "runs / windows", ".2f"),
                       ("peak", "cache peak (MB)", ".0f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
