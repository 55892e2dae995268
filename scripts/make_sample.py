#!/usr/bin/env python
"""Regenerate the bundled sample in ``sample/`` (synthetic light-sheet phantoms with exact labels).

    python scripts/make_sample.py            # writes sample/images, sample/labels, sample/sample.json

The same volumes come from the CLI, one at a time, e.g.
``lsmseg phantom sample --kind vessels --shape 48,160,160 --seed 0``.
tests/unit/test_phantom.py regenerates them from sample/sample.json and compares with the shipped files:
labels exactly, images to within 1e-4 of their voxels. Float rounding differs between numpy/BLAS builds
and CPUs and can change the shot-noise draw of a short run of voxels, so a rerun elsewhere may differ
there by noise-sized amounts (2026-12-07, this tree on the development machine: vessels_0 20 voxels in
one plane, up to 36 counts; cells_0 2; nuclei_0 none); commit a rerun only with a change to the generator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lsmseg.synth.phantom import write_phantom  # noqa: E402

SHAPE = (48, 160, 160)
SPACING = (3.0, 1.0, 1.0)
SAMPLE = [("vessels", 0), ("cells", 0), ("nuclei", 0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "sample", help="output folder (default: sample/)")
    args = parser.parse_args(argv)
    entries = []
    for kind, seed in SAMPLE:
        image, label = write_phantom(args.out, kind, SHAPE, seed, fmt="tif", spacing=SPACING)
        entries.append(
            {
                "kind": kind,
                "seed": seed,
                "shape": list(SHAPE),
                "spacing": list(SPACING),
                "image": image.relative_to(args.out).as_posix(),
                "label": label.relative_to(args.out).as_posix(),
            }
        )
        print(f"{image} ({image.stat().st_size / 1e6:.2f} MB), {label} ({label.stat().st_size / 1e6:.2f} MB)")
    (args.out / "sample.json").write_text(json.dumps({"phantoms": entries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
