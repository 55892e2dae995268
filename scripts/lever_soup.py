"""Lever measurement: a weight soup, the element-wise mean of models fine-tuned from one start.

Fine-tuned runs that share their starting weights and differ only in seed (data order, sampling,
augmentation) usually stay in one basin, where the mean of their weights scores at least as well as
each alone and varies less from seed to seed (Wortsman et al. 2022, "Model soups"). It costs
nothing at inference: the soup is one model of the same size. The aim here is microglia, whose
validation score swings by more with the seed than with any lever measured (training/README.md).

    python scripts/lever_soup.py weights runs/soup/seed1 -o runs/soup/mean

Each input is a weights folder or manifest (``lsmseg export`` writes one); their default models
must share the architecture. The output is a weights folder: the first input's manifest with the
mean's file and checksum, its validation and test sections dropped (they describe the first model,
not the soup) and ``provenance.soup`` naming the ingredients. Tune and score it as any weights
(``python -m lsmseg_training.tune -c CONFIG --weights OUT``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from lsmseg.weights import Manifest, load_manifest, load_state_dict, resolve_manifest, save_weights, write_manifest


def mean_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts with the same keys and shapes (float tensors averaged in
    float64, then cast back; integer tensors, e.g. counters, must agree and are copied)."""
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"ingredient {index}: tensor names differ from the first's "
                             f"({len(set(state) ^ keys)} names in one only)")
    total = sum(weights)
    mean = {}
    for key in states[0]:
        tensors = [state[key] for state in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"{key}: shapes differ ({[tuple(t.shape) for t in tensors]})")
        if tensors[0].is_floating_point():
            mixed = sum(w * t.double() for w, t in zip(weights, tensors)) / total
            mean[key] = mixed.to(tensors[0].dtype)
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ValueError(f"{key}: integer tensor differs between ingredients")
            mean[key] = tensors[0].clone()
    return mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ingredients", nargs="+", type=Path, help="weights folders or manifests (at least two)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="new weights folder")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per ingredient (default: equal)")
    args = parser.parse_args(argv)
    if len(args.ingredients) < 2:
        parser.error("a soup needs at least two ingredients")
    weights = args.weights or [1.0] * len(args.ingredients)
    if len(weights) != len(args.ingredients) or min(weights) < 0 or sum(weights) <= 0:
        parser.error("--weights: one non-negative weight per ingredient, not all zero")

    manifests: list[Manifest] = [load_manifest(resolve_manifest(path)) for path in args.ingredients]
    entries = [manifest.entry_for()[1] for manifest in manifests]
    for path, entry in zip(args.ingredients[1:], entries[1:]):
        if entry.model != entries[0].model:
            print(f"ERROR: {path}: its model differs from {args.ingredients[0]}'s; a soup needs one architecture",
                  file=sys.stderr)
            return 1
    states = [load_state_dict(manifest.checkpoint_path(entry), entry.sha256)
              for manifest, entry in zip(manifests, entries)]
    try:
        soup = mean_state(states, weights)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    name, first = manifests[0].entry_for()
    sha256 = save_weights(soup, args.out / first.file)
    provenance = dict(first.provenance)
    provenance["soup"] = [{"weights": str(path), "sha256": entry.sha256, "weight": weight}
                          for path, entry, weight in zip(args.ingredients, entries, weights)]
    entry = dataclasses.replace(first, sha256=sha256, validation={}, test={}, provenance=provenance)
    write_manifest(Manifest(models={name: entry}, default=name), args.out / "manifest.yaml")
    print(f"{args.out / first.file}: the mean of {len(states)} models (sha256 {sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
