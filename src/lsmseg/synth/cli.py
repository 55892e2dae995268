"""``lsmseg phantom`` (registered through the ``lsmseg.commands`` entry point)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import zyx
from ..errors import EXIT_OK
from . import KINDS


def add_commands(subparsers) -> None:
    """Register ``lsmseg phantom``."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic light-sheet volume and its exact label",
        description="Write a synthetic light-sheet phantom (uint16 image, exact uint8 label) for tests, "
        "demos and training. OUT is a folder: OUT/images/KIND_SEED.tif and OUT/labels/KIND_SEED.tif. "
        "Or OUT is a file name whose suffix picks the format (.tif, .nii.gz, .nii, .mha, .nrrd, .zarr): "
        "the image and label go to images/NAME and labels/NAME in OUT's folder. The spacing is stored "
        "in both files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("output", type=Path, metavar="OUT", help="output folder, or file name (format from its suffix)")
    p.add_argument("--kind", default="vessels", choices=KINDS, help="structure")
    p.add_argument("--shape", type=zyx(int), default="48,160,160", metavar="Z,Y,X", help="volume shape in voxels")
    p.add_argument("--spacing", type=zyx(float), default="3,1,1", metavar="Z,Y,X", help="voxel size in um")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same volume)")
    p.set_defaults(func=run_phantom)


def run_phantom(args) -> int:
    from ..io import KNOWN_SUFFIXES
    from .phantom import write_phantom

    out, name = args.output, None
    if out.name.lower().endswith(KNOWN_SUFFIXES):
        out, name = out.parent, out.name
    image, label = write_phantom(out, args.kind, args.shape, args.seed, spacing=args.spacing, name=name)
    print(f"image: {image}\nlabel: {label}")
    return EXIT_OK
