"""Per-structure post-processing chosen on the validation split, by the leaderboard's own metrics.

``python -m lsmseg_training.tune -c CONFIG --weights DIR [--mirror] [--default-threshold] [--write]``

Every validation volume of the config (each set names its ``structure``) is predicted once with the
weights exactly as ``lsmseg predict`` applies them (the manifest's inference settings), and once
more with test-time mirroring on every axis when ``--mirror`` asks (8 passes per window); then, per
structure, every combination of mirroring, threshold, touching-object splitting and small-component
removal is scored with the SELMA3D 2026 metrics (lsmseg_evaluation.leaderboard: Dice + panoptic quality
for isolated structures, Dice + clDice for contiguous ones), then every intensity floor and threshold
at the best row's other settings, and the row with the best mean of the two metrics is chosen.
``--write`` stores the choices in the manifest entry's ``inference.per_structure`` (the checkpoint
and its checksum are unchanged) with the validation scores that chose them.
``--default-threshold`` also chooses the threshold of structures without their own settings, on
phantoms of cells, nuclei and plaques (no real validation data of those kinds exists here).

The test split is never read here: choices made on it would make its scores optimistic.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from lsmseg.io.atomic import write_text

logger = logging.getLogger(__name__)

# Up to 0.998: the log-tail model's microglia probabilities saturate, and its validation score
# peaked at 0.995 (0.47 against 0.33 at 0.97, the grid's top before 2026-11-28).
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
MIN_COMPONENTS = (0, 10, 30, 100)
SPLITS = (0.0, 1.0, 2.0)  # split_touching h (voxels); isolated structures only
# InferenceSettings.intensity_floor (normalised intensity; 1 = the 99.5th percentile), searched in a
# second stage with every threshold at the first stage's best mirroring, splitting and removal (a
# full product would multiply the grid's scoring time by the floors). Up to 1.0 only: a floor is a
# bet on how bright labelled voxels are, and the labels of DELiVR's microglia brains disagree.
# Above 1.0 the validation brain (median labelled voxel at ~2.1) gains more (0.468 -> 0.616 at 1.75)
# but the training brains (0.7-1.4) collapse (0.318 -> 0.052); up to 1.0 they stay within 0.003
# (training/README.md, lever table, 2026-12-03). ``--floors`` searches others.
FLOORS = (0.5, 0.75, 1.0)
MIRROR_ALL = (0, 1, 2)  # InferenceSettings.mirror_axes: every flip the model trained with
# The manifest's default threshold serves structures with no real validation data: chosen on
# phantoms of those kinds, with seeds no training or validation config uses.
PHANTOM_KINDS = ("cells", "nuclei", "plaques")
PHANTOM_SEEDS = (701, 702)
PHANTOM_SHAPE = (48, 128, 128)


def validation_volumes(config, structures=None) -> list[dict]:
    """(name, structure, image path, label path, spacing) of every validation volume (of
    ``structures`` only, when given: the challenge's names or their aliases, ``cfos``)."""
    from lsmseg.structures import known_structure

    from .data import set_volumes

    # A set's structure is one of the challenge's names (the config refuses others): map aliases to them.
    structures = {known_structure(s) or s for s in structures} if structures else None
    volumes = []
    for index, volume_set in enumerate(config.data.validation):
        if volume_set.structure is None:
            raise SystemExit(f"ERROR: {volume_set.images}: validation set names no structure (set structure:)")
        if structures and volume_set.structure not in structures:
            continue
        for name, path, label in set_volumes(volume_set, f"data.validation[{index}]"):
            volumes.append({"name": name, "structure": volume_set.structure, "image": path, "label": label,
                            "label_values": volume_set.label_values,
                            "spacing": tuple(volume_set.spacing) if volume_set.spacing else None})
    return volumes


def leaderboard_score(structure: str, pred: np.ndarray, label: np.ndarray) -> dict:
    """Dice and the structure's second 2026 metric, and their mean (``score``; Dice alone where the
    second is NaN)."""
    from lsmseg.structures import category_of
    from lsmseg_evaluation.leaderboard import dice, panoptica_cldice, panoptica_pq

    result = {"dice": dice(pred, label)}
    if category_of(structure) == "isolated":
        result["panoptic_quality"] = panoptica_pq(pred, label)
        second = result["panoptic_quality"]
    else:
        result["cldice"] = panoptica_cldice(pred, label)
        second = result["cldice"]
    # The second metric is NaN where panoptica leaves it undefined: PQ when both masks are empty;
    # clDice then too, and also when either mask or either skeleton is empty or the two do not
    # overlap (an empty prediction against a vessel). The volume then scores its Dice alone. The
    # leaderboard has no combined score: it averages each metric over the cases (statistics.mean),
    # so one NaN case makes that metric's mean NaN; here a grid row must still be comparable.
    result["score"] = result["dice"] if math.isnan(second) else (result["dice"] + second) / 2
    return result


def tune(config, manifest_path: Path, thresholds=THRESHOLDS, min_components=MIN_COMPONENTS,
         splits=SPLITS, mirrors=((),), structures=None, floors=FLOORS, where: str | None = None,
         skip_background: bool = True, settings: dict | None = None) -> dict:
    """Predict the validation volumes (of ``structures`` only, when given) once per mirroring in
    ``mirrors``, score the grid per structure (then ``floors`` × ``thresholds`` at its best row's
    other settings), return the choices. ``where`` names the config in errors (its file; default
    its ``name:``). ``skip_background=False`` runs the network on every window, dark ones included
    (``RunOptions.skip_background``; a lever measurement, scripts/lever_skip_background.py).
    ``settings``: InferenceSettings fields that replace the manifest's for every prediction (a lever
    measurement, e.g. ``input_scale``: ``--input-scale``, scripts/lever_test_time_scale.py)."""
    import dataclasses

    from lsmseg.config import input_scale_factors, plain
    from lsmseg.io import read_volume
    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.structures import category_of

    from .data import check_splits, dense_label

    where = where or config.name
    check_splits(config.data, where)  # validation volumes that are also training or test ones would flatter

    predictor = Predictor.from_manifest(manifest_path,
                                        options=RunOptions(progress=False, skip_background=skip_background))
    manifest_settings = predictor.settings
    base = dataclasses.replace(manifest_settings, per_structure={}, **(settings or {}))
    mirrors = [tuple(axes) for axes in mirrors]
    volumes = validation_volumes(config, structures)
    if not volumes:
        raise SystemExit(f"ERROR: {where}: no validation volumes of {', '.join(structures or ['any structure'])}")
    predict_seconds = dict.fromkeys(mirrors, 0.0)
    for volume in volumes:
        image = read_volume(volume["image"]).load()
        # Read and checked as fine-tuning's validation reads it (a label_values: binary set must be binary).
        volume["truth"] = dense_label(volume["label"], volume["label_values"])
        normalised = predictor.normalised(image, volume["name"])  # once: the network's input and the floors'
        volume["intensity"] = normalised if floors else None
        volume["logits"] = {}
        for axes in mirrors:
            # Validation names carry no structure prefix: the mirroring is set for the whole predictor.
            predictor.settings = dataclasses.replace(base, mirror_axes=axes)
            start = time.perf_counter()
            volume["logits"][axes] = predictor.logits_from_normalised(normalised, volume["spacing"], volume["name"])[0]
            predict_seconds[axes] += time.perf_counter() - start
            logger.info("predicted %s (%s), mirror axes %s", volume["name"], volume["structure"], axes)
    choices, grids = {}, {}
    for structure in sorted({v["structure"] for v in volumes}):
        members = [v for v in volumes if v["structure"] == structure]
        structure_splits = splits if category_of(structure) == "isolated" else (0.0,)

        def scored(axes, threshold, split, min_voxels, floor) -> dict:
            settings = dataclasses.replace(base, threshold=threshold, split_touching=split,
                                           min_component_voxels=min_voxels, intensity_floor=floor)
            scores = [leaderboard_score(structure, predictor.binary_mask(v["logits"][axes], settings=settings,
                                                                         intensity=v["intensity"]),
                                        v["truth"]) for v in members]
            row = {"mirror_axes": list(axes), "threshold": threshold, "split_touching": split,
                   "min_component_voxels": min_voxels, "intensity_floor": floor, "input_scale": plain(base.input_scale)}
            for key in scores[0]:
                defined = [s[key] for s in scores if not math.isnan(s[key])]
                row[key] = round(float(np.mean(defined)), 5) if defined else None  # None: NaN on every volume
            # Each metric is averaged over the volumes where it is defined, and score is the mean of
            # the volumes' scores: with NaN volumes, score is not the mean of dice and the second.
            second = "panoptic_quality" if "panoptic_quality" in scores[0] else "cldice"
            row[f"nan_{second}"] = sum(math.isnan(s[second]) for s in scores)
            return row

        rows = [scored(*combination, None) for combination in
                itertools.product(mirrors, thresholds, structure_splits, min_components)]
        first = max(rows, key=lambda r: r["score"])
        rows += [scored(tuple(first["mirror_axes"]), threshold, first["split_touching"],
                        first["min_component_voxels"], floor)
                 for floor, threshold in itertools.product(floors, thresholds)]
        # Best mean score; ties go to the simpler setting (the grid's earlier, plainer entries).
        best = max(rows, key=lambda r: r["score"])
        # The structure's settings before this tune (its manifest entry over the defaults): the
        # figure a re-tune is measured against. None when the grid does not hold them (a previous
        # threshold of 0.93 is not the 0.9 row). (Manifests tuned before 2026-12-02 hold
        # at_manifest_settings instead: the global defaults' row.)
        before = manifest_settings.for_structure(structure)
        at_previous = next((r for r in rows if r["mirror_axes"] == list(before.mirror_axes)
                            and _same(r["threshold"], before.threshold)
                            and r["split_touching"] == (before.split_touching if structure_splits != (0.0,) else 0.0)
                            and r["min_component_voxels"] == before.min_component_voxels
                            and _same(r["intensity_floor"], before.intensity_floor)
                            and _same(input_scale_factors(r["input_scale"]),
                                      input_scale_factors(before.input_scale))), None)
        # Every setting a row was scored at, null floor and no mirroring included: a key left out
        # would let the manifest's global value apply, which is not what was scored.
        choices[structure] = {key: best[key] for key in ("threshold", "split_touching", "min_component_voxels",
                                                         "intensity_floor", "mirror_axes", "input_scale")}
        grids[structure] = {"volumes": [v["name"] for v in members], "best": best, "at_previous_settings": at_previous,
                            "grid": rows}
        metrics = [k for k in best if k not in choices[structure] and not k.startswith("nan_")]
        logger.info("%s: %s -> mean score %.4f (%s)", structure, choices[structure], best["score"],
                    ", ".join(f"{k} {best[k]:.4f}" if best[k] is not None else f"{k} undefined" for k in metrics))
    return {"per_structure": choices, "validation": grids,
            "predict_seconds": {str(list(axes)): round(seconds, 1) for axes, seconds in predict_seconds.items()}}


def _same(value, other) -> bool:
    """Whether two settings are equal (None only to None; floats within 1e-9, as YAML round-trips them;
    sequences factor by factor)."""
    if value is None or other is None:
        return value is other
    if isinstance(value, (list, tuple)) or isinstance(other, (list, tuple)):
        return (isinstance(value, (list, tuple)) and isinstance(other, (list, tuple)) and len(value) == len(other)
                and all(map(_same, value, other)))
    return abs(value - other) <= 1e-9


def phantom_threshold(manifest_path: Path, thresholds=THRESHOLDS, kinds=PHANTOM_KINDS, seeds=PHANTOM_SEEDS,
                      shape=PHANTOM_SHAPE) -> dict:
    """The threshold with the best mean Dice on phantoms of ``kinds`` (one pass per window, the
    manifest's other settings; component removal does not apply: Dice hardly moves with it)."""
    import torch

    from lsmseg.inference import Predictor, RunOptions
    from lsmseg.synth.phantom import make_phantom
    from lsmseg_evaluation.leaderboard import dice

    predictor = Predictor.from_manifest(manifest_path, options=RunOptions(progress=False), per_structure={},
                                        mirror_axes=())
    scores = []
    for kind, seed in itertools.product(kinds, seeds):
        phantom = make_phantom(kind, shape, seed)
        logits = predictor.predict_logits(phantom.image, phantom.spacing, name=f"{kind}_{seed}")
        probabilities = torch.sigmoid(torch.from_numpy(logits)).numpy()
        scores.append([dice(probabilities >= t, phantom.label != 0) for t in thresholds])
    mean = np.mean(scores, axis=0)
    return {
        "threshold": float(thresholds[int(np.argmax(mean))]),
        "why": f"structures without tuned settings (no real validation data) use the threshold with the best mean "
               f"Dice on {len(scores)} validation phantoms ({', '.join(kinds)}; seeds "
               f"{', '.join(map(str, seeds))}, {'x'.join(map(str, shape))}, never trained on)",
        "phantom_dice_by_threshold": {float(t): round(float(d), 3) for t, d in zip(thresholds, mean)},
    }


def writable_manifest(weights: Path) -> Path:
    """The manifest ``weights`` names, refused when it is a model tarball's extracted copy (choices
    written there would be lost with the scratch folder)."""
    import os

    from lsmseg.errors import WeightsError
    from lsmseg.weights import resolve_manifest

    weights = Path(weights)
    path = resolve_manifest(weights)
    inside = os.path.realpath(path) == os.path.realpath(weights) or (
        weights.is_dir() and os.path.realpath(path).startswith(os.path.realpath(weights) + os.sep))
    if not inside:
        raise WeightsError(f"{weights}: a model tarball cannot take the choices (they would go to its extracted "
                           "copy in scratch space); extract it and pass the folder")
    return path


def write_choices(manifest_path: Path, result: dict) -> Path:
    """Store the chosen per-structure settings and their validation scores in the manifest entry;
    structures not tuned in ``result`` keep what the manifest holds."""
    from lsmseg.weights import load_manifest, write_manifest

    path = writable_manifest(manifest_path)
    manifest = load_manifest(path)
    from lsmseg.structures import known_structure

    name, entry = manifest.entry_for(None)
    # A tuned structure replaces the manifest's entry for it under any name (an alias key, vessels).
    tuned = {known_structure(structure) for structure in result["per_structure"]}
    kept = {key: value for key, value in entry.inference.per_structure.items() if known_structure(key) not in tuned}
    entry.inference.per_structure = {**kept, **result["per_structure"]}
    entry.inference.__post_init__()  # validate the merged values before writing
    entry.validation["per_structure"] = {
        **entry.validation.get("per_structure", {}),
        **{structure: {"volumes": grid["volumes"], "chosen": grid["best"],
                       "at_previous_settings": grid["at_previous_settings"]}
           for structure, grid in result["validation"].items()},
    }
    if "default_threshold" in result:
        entry.inference.threshold = result["default_threshold"]["threshold"]
        entry.validation["default_threshold"] = result["default_threshold"]
    return write_manifest(manifest, path)


def main(argv=None) -> int:
    from lsmseg.argtypes import input_scale
    from lsmseg.errors import LsmsegError

    from .config import FinetuneConfig, load_run_config

    parser = argparse.ArgumentParser(prog="python -m lsmseg_training.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="fine-tuning config (its data.validation)")
    parser.add_argument("--weights", type=Path, required=True, help="weights manifest or folder to tune")
    parser.add_argument("--out", type=Path, help="JSON with the whole grid (default: print the choices only)")
    parser.add_argument("--write", action="store_true", help="store the choices in the manifest")
    parser.add_argument("--default-threshold", action="store_true",
                        help="also choose the manifest's default threshold (structures without their own "
                             "settings) on phantoms of cells, nuclei and plaques")
    parser.add_argument("--mirror", action="store_true",
                        help="also predict with test-time mirroring on every axis (8x the time) and let "
                             "each structure choose (without it, every choice written is one pass: mirror_axes [])")
    parser.add_argument("--floors", type=float, nargs="*", default=list(FLOORS), metavar="X",
                        help=f"intensity floors of the second stage (default: {' '.join(map(str, FLOORS))}; "
                             "none given: no second stage, the grid of before 2026-12-03)")
    parser.add_argument("--input-scale", type=input_scale, default=1.0, metavar="X|Z,Y,X",
                        help="predict every volume resampled by X per axis, or by Z,Y,X (test-time rescaling, "
                             "InferenceSettings.input_scale); the choices written carry it (default: 1)")
    parser.add_argument("--structures", nargs="+", metavar="STRUCTURE",
                        help="tune only these structures' validation volumes; with --write, the others keep "
                             "the manifest's settings (default: every structure of the config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # a bad config, split or manifest: one line naming its file (exit 1), not a traceback
        config = load_run_config(FinetuneConfig, args.config)
        if args.write:
            writable_manifest(args.weights)  # before the grid (~30 min), not after it
        result = tune(config, args.weights, mirrors=((), MIRROR_ALL) if args.mirror else ((),),
                      structures=args.structures, floors=tuple(args.floors), where=str(args.config),
                      settings={"input_scale": args.input_scale})
        if args.default_threshold:
            result["default_threshold"] = phantom_threshold(args.weights)
            logger.info("default threshold %s (phantom Dice %s)", result["default_threshold"]["threshold"],
                        result["default_threshold"]["phantom_dice_by_threshold"])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_text(json.dumps(result, indent=1), args.out)  # a grid takes ~30 min: never half a file
        print(json.dumps(result["per_structure"], indent=1))
        if args.write:
            print(write_choices(args.weights, result))
    except LsmsegError as exc:
        raise SystemExit(f"ERROR: {exc}") from None
    except OSError as exc:  # e.g. --out's folder cannot be made
        raise SystemExit(f"ERROR: {exc.filename or args.out}: {exc.strerror or exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
