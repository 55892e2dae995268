#!/usr/bin/env python3
"""Pack the real training and validation data for a GPU run into a folder the device call carries.

The device machine has no network and never sees ``../shared/data/real``: what it trains on must
travel with the working tree, whose limit (64 MiB) the repository and the wheels already half fill.
This script takes the train and validation splits of a training config (default
``training/configs/general_finetune_real_logtail.yaml``, the shipped weights' run: splits by source,
the test split is never packed), and writes, within a byte budget:

    OUT/<split>/<set>/images/<name>.tif, OUT/<split>/<set>/labels/<name>.tif   (zlib TIFF)
    OUT/finetune.yaml   training/configs/gpu_finetune_real.yaml with data.train/validation pointing here,
                        and the packed config's normalisation (percentiles, upper_tail)
    OUT/pack.json       what was packed and left out, sizes, quantisation, the budget

How images are stored follows the config's ``data.upper_tail`` (``lsmseg.normalise``):
- ``clip``: images that are not 8-bit are stored as uint8 over the range inference normalises to (the
  volume's 0.5 / 99.5 percentiles; values outside it are clipped there anyway): the network's input
  changes by at most 1/510 of that range (recorded per volume).
- ``log``: the bright tail above the upper percentile is input too, so it may not be clipped. Images
  that are not 8-bit are stored as uint16 with the same 255 steps over the percentile range and the
  tail continuing above 255 (an affine map, which the percentile normalisation undoes; mostly small
  values, so they compress almost as well as uint8); the largest change of the normalised input is
  recorded per volume.
Labels are stored as uint8 (binary sets as {0, 1}; sparse sets keep their values). Volumes are taken
one from each set of each split in turn (and within a set, one from each source in turn), so that
every set and source is represented before any gets a second volume; a volume that does not fit the
budget is left out and listed (pack.json; the count is printed). With ``--stand-in``, small phantoms
in the same layout replace the real data (the dry run of scripts/gpu_check.sh).

    python scripts/gpu_pack_data.py [--data DIR] [--out .gpu_data] [--max-mb N] [--stand-in]

The pack is built in a hidden folder beside ``--out`` and renamed into place only when complete, so a
failed run leaves the previous pack as it was. ``--out`` replaces only an empty folder or a previous pack
(one holding ``pack.json``); an ``--out`` that is, holds or lies inside the data (the data root or a set's
images or labels) or is or holds the repository is refused before any volume is read.
Exit codes: 0 packed; 1 failed (a volume or the config cannot be read: one line
``gpu_pack_data: <message>``); 2 usage (bad arguments, an ``--out`` refused as above).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "training")]

from lsmseg.argtypes import positive  # noqa: E402
from lsmseg.config import load_yaml, to_dict  # noqa: E402
from lsmseg.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, LsmsegError  # noqa: E402
from lsmseg.io import read_volume, write_volume  # noqa: E402
from lsmseg.io.atomic import atomic_output, sweep_partials  # noqa: E402
from lsmseg.normalise import normalise, percentiles  # noqa: E402
from lsmseg.realdata import real_data_root  # noqa: E402
from lsmseg_training.config import FinetuneConfig, load_run_config  # noqa: E402
from lsmseg_training.data import check_splits, dense_label, set_volumes, source_of, sparse_label  # noqa: E402

SPLITS = ("train", "validation")
DEVICE_TREE_LIMIT = 64 * 2**20  # what one device call carries: tracked + untracked files + carried paths
MARGIN = 2 * 2**20  # files that appear in the tree meanwhile (scripts, notes)
GPU_CONFIG = REPO / "training" / "configs" / "gpu_finetune_real.yaml"
STAND_IN_SHAPE = (32, 40, 64)  # one window of the dry run's 32x32x64 model in y, two at overlap 0.5 at most
STAND_IN_KINDS = {"blood_vessel": "vessels", "axonalmarker": "vessels", "cfos_neuron": "cells", "microglia": "cells"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def tree_bytes() -> int:
    """What a device call sends without carried paths: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def default_budget(wheels: Path) -> int:
    return DEVICE_TREE_LIMIT - tree_bytes() - folder_bytes(wheels) - MARGIN


def set_key(volume_set, index: int) -> str:
    return volume_set.structure or f"set{index}"


def as_stored(image: np.ndarray, lower: float, upper: float, upper_tail: str) -> tuple[np.ndarray, dict]:
    """The image as packed for normalisation with ``upper_tail`` (see the module docstring), with what that cost:
    ``max_normalised_error``, the largest change of the normalised input, where it changes at all."""
    if image.dtype == np.uint8:
        return image, {"quantised": False}
    lo, hi = percentiles(image, lower, upper)
    scaled = normalise(image, lo, hi, upper_tail=upper_tail)
    if upper_tail == "clip":
        stored = np.rint(scaled * 255.0).astype(np.uint8)
    else:  # the same 255 steps over [lo, hi], the tail above them in uint16 (an affine map the normaliser undoes)
        step = max((hi - lo) / 255.0, (float(image.max()) - lo) / 65535.0, 1e-12)
        stored = np.rint(np.clip((image.astype(np.float64) - lo) / step, 0, 65535)).astype(np.uint16)
    stored_lo, stored_hi = percentiles(stored, lower, upper)
    error = float(np.abs(normalise(stored, stored_lo, stored_hi, upper_tail=upper_tail) - scaled).max())
    return stored, {"quantised": True, "dtype": str(image.dtype), "stored_dtype": str(stored.dtype), "lo": float(lo),
                    "hi": float(hi), "max_normalised_error": round(error, 6)}


def encoded(array: np.ndarray, spacing) -> bytes:
    """The TIFF bytes lsmseg's writer produces for ``array`` (zlib), to size a volume before choosing it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = write_volume(array, Path(folder) / "v.tif", spacing=spacing)
        return path.read_bytes()


def round_robin(queues: list[list]) -> list:
    """The items of ``queues`` taken one from each queue in turn."""
    ordered, pending = [], [list(q) for q in queues if q]
    while pending:
        for queue in list(pending):
            ordered.append(queue.pop(0))
            if not queue:
                pending.remove(queue)
    return ordered


def candidates(config) -> list[dict]:
    """Every train and validation volume of ``config`` in the order they are taken: one per set (and split) in
    turn, and within a set one per source in turn."""
    per_set = []
    for split in SPLITS:
        for index, volume_set in enumerate(getattr(config.data, split)):
            sources: dict[str, list[dict]] = {}
            for name, image, label in set_volumes(volume_set, f"data.{split}[{index}]"):
                sources.setdefault(source_of(volume_set, name), []).append(
                    {"split": split, "set": set_key(volume_set, index), "name": name, "image": image, "label": label,
                     "volume_set": volume_set})
            per_set.append(round_robin(list(sources.values())))
    return round_robin(per_set)


def pack_real(config, out: Path, budget: int) -> tuple[list[dict], list[dict]]:
    packed, left_out, used = [], [], 0
    for item in candidates(config):
        volume_set = item["volume_set"]
        image = read_volume(item["image"])
        stored, quantisation = as_stored(image.load(), config.data.lower_percentile,
                                         config.data.upper_percentile, config.data.upper_tail)
        # Labels checked as training checks them: the packed uint8 copy would pass any check.
        label = (sparse_label(item["label"]) if volume_set.label_mode == "sparse"
                 else dense_label(item["label"], volume_set.label_values).astype(np.uint8))
        blobs = {"images": encoded(stored, image.spacing), "labels": encoded(label, image.spacing)}
        size = sum(len(b) for b in blobs.values())
        entry = {k: item[k] for k in ("split", "set", "name")} | {"source": str(item["image"]), "bytes": size,
                                                                   **quantisation}
        if used + size > budget:
            left_out.append(entry)
            continue
        for kind, blob in blobs.items():
            path = out / item["split"] / item["set"] / kind / f"{item['name']}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        used += size
        packed.append(entry)
    return packed, left_out


def pack_stand_in(config, out: Path) -> tuple[list[dict], list[dict]]:
    """One small phantom per set in the packed layout (no real data needed: the dry run)."""
    from lsmseg.synth.phantom import write_phantom

    packed = []
    for split in SPLITS:
        for index, volume_set in enumerate(getattr(config.data, split)):
            key = set_key(volume_set, index)
            kind = STAND_IN_KINDS.get(volume_set.structure, "vessels")
            image, label = write_phantom(out / split / key, kind, STAND_IN_SHAPE, seed=index + 10 * SPLITS.index(split))
            if volume_set.label_mode == "sparse":  # 1 = background, 2 = foreground (0 = unlabelled)
                write_volume(read_volume(label).load() + 1, label)
            packed.append({"split": split, "set": key, "name": f"{kind} phantom", "stand_in": True})
    return packed, []


def packed_config(config, out: Path, stand_in: bool = False) -> dict:
    """gpu_finetune_real.yaml with the packed sets as data.train / data.validation ($LSMSEG_DATA = the pack) and
    the packed config's normalisation, which the stored images were made for. Stand-in phantoms
    (``stand_in``) keep no ``source`` pattern: their names are not the real volumes' (each packed set has
    its own folder per split, so the split check still holds)."""
    data = load_yaml(GPU_CONFIG)
    data.setdefault("data", {}).update({key: getattr(config.data, key)
                                        for key in ("lower_percentile", "upper_percentile", "upper_tail")})
    for split in SPLITS:
        sets = []
        for index, volume_set in enumerate(getattr(config.data, split)):
            key = set_key(volume_set, index)
            if not (out / split / key / "images").is_dir():
                continue
            entry = to_dict(dataclasses.replace(volume_set, include=[], exclude=[]))
            entry.update(images=f"$LSMSEG_DATA/{split}/{key}/images", labels=f"$LSMSEG_DATA/{split}/{key}/labels")
            if stand_in:
                entry.pop("source", None)
            sets.append({k: v for k, v in entry.items() if v not in ([], None)})
        data.setdefault("data", {})[split] = sets
    return data


def out_refusal(out: Path, config, data_root: Path) -> str | None:
    """Why ``out`` may not be (re)written, or None: the whole folder is replaced, so it may neither touch
    the data it packs (the data root, any set's images or labels) nor the repository, and may only
    replace an empty folder or a previous pack."""
    target = out.resolve()
    protected = [("the data root", data_root)] + [
        (f"data.{split}[{index}].{key}", Path(getattr(volume_set, key)))
        for split in ("train", "validation", "test") for index, volume_set in enumerate(getattr(config.data, split))
        for key in ("images", "labels") if getattr(volume_set, key)]
    for what, path in protected:
        path = path.resolve()
        relation = ("is" if target == path else "lies inside" if target.is_relative_to(path)
                    else "holds" if path.is_relative_to(target) else None)
        if relation:
            return f"--out {out}: {relation} {what} ({path}); the pack replaces its whole folder, so it must lie apart from the data"
    if REPO.is_relative_to(target):
        return f"--out {out}: is or holds the repository ({REPO}); choose a folder of its own (default .gpu_data)"
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / "pack.json").is_file():
        return (f"--out {out}: is a folder that is neither empty nor a previous pack (no pack.json); refusing to replace it "
                "(an unfinished pack? remove it)")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "training/configs/general_finetune_real_logtail.yaml",
                        help="training config whose train and validation splits are packed")
    parser.add_argument("--data", type=Path, help="real-data folder ($LSMSEG_DATA; default as lsmseg.realdata)")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu_data",
                        help="pack folder (ignored by git); replaces only an empty folder or a previous pack")
    parser.add_argument("--max-mb", type=positive, help="byte budget in MiB, above 0 (default: 64 MiB less the tree, .whl and 2 MiB)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the wheels the same call carries")
    parser.add_argument("--stand-in", action="store_true", help="phantoms instead of the real data (dry run)")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(FinetuneConfig, args.config, args.data)
        refusal = out_refusal(args.out, config, real_data_root(args.data))
        if refusal:
            print(f"gpu_pack_data: {refusal}", file=sys.stderr)
            return EXIT_USAGE
        if not args.stand_in:  # the sets' own checks (a source pattern that misses a name, ...) before packing
            check_splits(config.data, str(args.config))
        # Built beside --out and renamed into place when complete: a failure keeps the previous pack,
        # and a killed run's half-built pack (hundreds of MiB) is removed by the next run.
        sweep_partials(args.out.parent, target=args.out.name)
        with atomic_output(args.out, folder=True) as tmp:
            summary = pack(config, args, tmp)
    except LsmsegError as exc:
        print(f"gpu_pack_data: {exc}", file=sys.stderr)
        return EXIT_FAILED
    packed, budget = summary["packed"], summary["budget_bytes"]
    counts = {split: sum(1 for p in packed if p["split"] == split) for split in SPLITS}
    print(f"{args.out}: {summary['bytes'] / 2**20:.1f} MiB ({'stand-in phantoms' if args.stand_in else f'budget {budget / 2**20:.1f} MiB'}); packed "
          f"{counts['train']} training and {counts['validation']} validation volume(s), left out {len(summary['left_out'])}")
    return EXIT_OK


def pack(config, args, out: Path) -> dict:
    """Write the pack into ``out`` (a new folder); return what pack.json holds."""
    out.mkdir()
    if args.stand_in:
        budget = None
        packed, left_out = pack_stand_in(config, out)
    else:
        budget = int(args.max_mb * 2**20) if args.max_mb else default_budget(args.wheels)
        packed, left_out = pack_real(config, out, budget)
    (out / "finetune.yaml").write_text(
        f"# Written by scripts/gpu_pack_data.py from {GPU_CONFIG.relative_to(REPO)} and the splits of "
        f"{args.config.name}; $LSMSEG_DATA is this folder.\n" + yaml.safe_dump(packed_config(config, out, args.stand_in),
                                                                                   sort_keys=False))
    summary = {"config": str(args.config), "budget_bytes": budget, "bytes": folder_bytes(out),
               "stand_in": args.stand_in, "packed": packed, "left_out": left_out}
    (out / "pack.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
