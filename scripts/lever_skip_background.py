"""Lever measurement: the network run on every window, dark ones included, against skipping them.

Inference skips windows whose every voxel is as dark as the volume's background and blends in the
model's answer to a uniform dark window instead (``RunOptions.skip_background``,
:mod:`lsmseg.inference.foreground`). On both poon2015 vessel validation stacks this drops labelled
vessel voxels (BBB_Leakage: 4 of 225 windows skipped, 25 of 302 labelled objects hit lose their
voxels) and also false positives, so which way the leaderboard score moves was not known. This
tunes the same weights on the same validation volumes both ways (each way the tune grid with
and without mirroring when ``--mirror`` asks) and writes both grids' best rows side by side:

    python scripts/lever_skip_background.py -c training/configs/general_finetune_real_logtail.yaml \\
        --weights weights --mirror --structures blood_vessel --out F.json

Validation volumes only (``tune`` checks the splits); the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lsmseg.errors import LsmsegError
from lsmseg.io import write_json
from lsmseg_training.config import FinetuneConfig, load_run_config
from lsmseg_training.tune import MIRROR_ALL, tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="fine-tuning config (its data.validation)")
    parser.add_argument("--weights", type=Path, required=True, help="weights manifest or folder")
    parser.add_argument("--mirror", action="store_true", help="also score test-time mirroring, both ways")
    parser.add_argument("--structures", nargs="+", default=["blood_vessel"], metavar="STRUCTURE")
    parser.add_argument("--out", type=Path, required=True, help="JSON with both grids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mirrors = ((), MIRROR_ALL) if args.mirror else ((),)
    result = {}
    try:  # a bad config, split or manifest: one line naming its file, as tune's own command says it
        config = load_run_config(FinetuneConfig, args.config)
        for label, skip in (("skip_dark_windows", True), ("every_window", False)):
            result[label] = tune(config, args.weights, mirrors=mirrors, structures=args.structures,
                                 where=str(args.config), skip_background=skip)
    except LsmsegError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    result["best_side_by_side"] = {
        structure: {label: result[label]["validation"][structure]["best"] for label in ("skip_dark_windows", "every_window")}
        for structure in result["skip_dark_windows"]["validation"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    print(json.dumps(result["best_side_by_side"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
