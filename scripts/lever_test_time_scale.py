"""Lever measurement: test-time rescaling, the input enlarged (or shrunk) before the network.

At the shipped settings 255 of c-Fos validation brain 1147's 646 labelled cells are missed, most
with cores under 10 voxels (training/README.md, lever table, "growing c-Fos's small components").
The model trained with zoom augmentation (0.8-1.25), so it has seen objects up to 1.25x larger than
the data holds. This predicts the validation volumes resampled by ``scale`` per axis, or by three
factors ``Z,Y,X`` (``InferenceSettings.input_scale``: trilinear, the logits resampled back to the volume's grid), tunes the grid at each scale, and writes
every scale's best row, keyed by the scale (``1.5``, ``1.5,1.0,1.0``; ``tune --input-scale X`` does one scale):

    python scripts/lever_test_time_scale.py -c training/configs/general_finetune_real_logtail.yaml \\
        --weights weights --structures cfos_neuron --scales 1.0 1.25 1.5 --out F.json

Validation volumes only (``tune`` checks the splits); the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lsmseg.argtypes import input_scale
from lsmseg.config import input_scale_text, plain
from lsmseg.errors import LsmsegError
from lsmseg.io import write_json
from lsmseg.structures import known_structure
from lsmseg_training.config import FinetuneConfig, load_run_config
from lsmseg_training.tune import tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="fine-tuning config (its data.validation)")
    parser.add_argument("--weights", type=Path, required=True, help="weights manifest or folder")
    parser.add_argument("--structures", nargs="+", default=["cfos_neuron"], metavar="STRUCTURE")
    parser.add_argument("--scales", nargs="+", type=input_scale, default=[1.0, 1.25, 1.5],  # checked before any run
                        metavar="X|Z,Y,X", help="one run per value: a factor for every axis, or three (z, y, x)")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every grid")
    args = parser.parse_args(argv)
    keys = [input_scale_text(scale) for scale in args.scales]
    for key in {k for k in keys if keys.count(k) > 1}:  # one run each: a repeat would be tuned again, then overwritten
        parser.error(f"--scales: scale {key} given more than once")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {"scales": plain(args.scales), "by_structure": {}}
    try:  # a bad config, split or manifest: one line naming its file, as tune's own command says it
        config = load_run_config(FinetuneConfig, args.config)
        for structure in args.structures:
            structure = known_structure(structure) or structure  # tune keys its grids by the name, not an alias
            runs = {}
            for key, scale in zip(keys, args.scales):  # keys readable in JSON: "1.5", "1.5,1.0,1.0"
                runs[key] = tune(config, args.weights, structures=[structure], where=str(args.config),
                                 settings={"input_scale": scale})
                best = runs[key]["validation"][structure]["best"]
                logging.info("%s at scale %s: best %s", structure, key, best)
            result["by_structure"][structure] = {
                "best_by_scale": {scale: run["validation"][structure]["best"] for scale, run in runs.items()},
                "runs": runs}
    except LsmsegError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    print(json.dumps({s: r["best_by_scale"] for s, r in result["by_structure"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
