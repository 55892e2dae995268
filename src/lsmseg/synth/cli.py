"""``lsmseg phantom`` (registered through the ``lsmseg.commands`` entry point)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .. import argtypes
from ..cli import UsageError, zyx
from ..errors import EXIT_FAILED, EXIT_OK, ConfigError, printable
from . import KINDS

logger = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    """Register ``lsmseg phantom``."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic light-sheet volume and its exact label",
        description="Write a synthetic light-sheet phantom (uint16 image, exact uint8 label) for tests, "
        "demos and training. OUT is a folder: OUT/images/KIND_SEED.tif and OUT/labels/KIND_SEED.tif. "
        "Or OUT is a file name whose suffix picks the format (.tif, .tiff, .ome.tif, .nii.gz, .nii, .mha, "
        ".mhd, .nrrd, .nhdr, .zarr, .ome.zarr): the image and label go to images/NAME and labels/NAME in "
        "OUT's folder. Any other suffix is refused unless OUT is an existing folder. The spacing is stored "
        "in both files. An existing phantom of the same name is replaced; the pair is written whole or not "
        "at all. Exit codes: 0 written, 1 the output cannot be written, 2 bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("output", metavar="OUT",
                   help="output folder, or file name (format from its suffix); end it with / for a new folder "
                        "whose name has a dot")
    p.add_argument("--kind", default="vessels", choices=KINDS, help="structure")
    p.add_argument("--shape", type=zyx(int), default="48,160,160", metavar="Z,Y,X",
                   help="volume shape in voxels (refused when it would not fit in memory, about 100 bytes a voxel)")
    p.add_argument("--spacing", type=zyx(float), default="3,1,1", metavar="Z,Y,X", help="voxel size in um (0.05-20)")
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0,
                   help="random seed, >= 0 (same seed, same volume)")
    p.set_defaults(func=run_phantom)


def run_phantom(args) -> int:
    """``lsmseg phantom``: write one phantom's image and label.

    Returns:
        :data:`EXIT_OK`, or :data:`EXIT_FAILED` when there was not enough memory after all.

    Raises:
        UsageError: an option the phantom cannot use (spacing range, a shape too large, OUT's suffix).
        OutputError: the output cannot be written (checked before the phantom is built).
    """
    from ..io import KNOWN_SUFFIXES
    from .phantom import write_phantom

    out, name = Path(args.output), None
    folder_meant = args.output.endswith(("/", os.sep))  # Path() drops the separator that says so
    if not folder_meant and out.name.lower().endswith(KNOWN_SUFFIXES):
        out, name = out.parent, out.name
    elif out.suffix and not folder_meant and not out.is_dir():  # x.png would silently become a folder
        raise UsageError(f"OUT {printable(args.output)}: {printable(out.suffix)} is not a volume format (use one of "
                         f"{', '.join(sorted(KNOWN_SUFFIXES))}); end OUT with / for a new folder of that name")
    try:
        image, label = write_phantom(out, args.kind, args.shape, args.seed, spacing=args.spacing, name=name)
    except ConfigError as exc:  # raised by its argument checks, before any folder is made: a usage error
        message = str(exc)
        option = ("--spacing" if message.startswith("phantom spacing") else "--shape"
                  if message.startswith("phantom shape") else "OUT")
        raise UsageError(f"{option}: {exc}") from None
    except MemoryError:  # the estimate was short, or memory went to another process meanwhile
        logger.error("%s: not enough memory to build a phantom of shape %s", printable(args.output),
                     ",".join(map(str, args.shape)))
        return EXIT_FAILED
    print(f"image: {printable(image)}\nlabel: {printable(label)}")
    return EXIT_OK
