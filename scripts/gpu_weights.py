#!/usr/bin/env python3
"""Weights across the device boundary: fp16 parts small enough to come back, and their reassembly.

A device call returns at most 8 files of 16 MiB (64 MiB in all). ``split`` takes an export made by
``lsmseg export`` (a folder with ``manifest.yaml``), stores its default model's tensors in fp16
(half the bytes; floating tensors only) and cuts that file into parts of at most ``--part-mb`` MiB,
beside an index (``NAME.json``: the sha256 of the fp16 file and of every part, the manifest text).
``join`` checks every part's and the whole file's sha256, then writes a weights folder that
``lsmseg predict --weights`` takes: the fp32 tensors (from fp16) and the manifest with that file's sha256
(the joined fp16 file is only a step there and is removed: nothing reads it afterwards).
Exit codes: 0 done; 1 failed (one line ``ERROR: ...``: a part missing or damaged, no export); 2 usage.

    python scripts/gpu_weights.py split EXPORT_DIR OUT_DIR [--name gpu_weights] [--part-mb 15]
    python scripts/gpu_weights.py join OUT_DIR/gpu_weights.json -o WEIGHTS_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lsmseg.argtypes import positive  # noqa: E402
from lsmseg.errors import EXIT_FAILED, EXIT_OK, LsmsegError  # noqa: E402
from lsmseg.io.atomic import partial_path, remove_path  # noqa: E402
from lsmseg.weights import (  # noqa: E402
    Manifest, load_manifest, load_state_dict, save_weights, write_manifest,
)

FP16_SUFFIX = ".fp16.safetensors"


def split(export_dir: Path, out_dir: Path, name: str, part_mb: float) -> Path:
    import torch

    manifest = load_manifest(export_dir)
    model_name, entry = manifest.entry_for(None)
    state = load_state_dict(manifest.checkpoint_path(entry), entry.sha256)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    part_bytes = int(part_mb * 2**20)
    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / f"{name}{FP16_SUFFIX}"
        digest = save_weights(half, whole)  # the file's sha256
        data = whole.read_bytes()
    parts = []
    for index, start in enumerate(range(0, len(data), part_bytes)):
        chunk = data[start : start + part_bytes]
        part = out_dir / f"{name}{FP16_SUFFIX}.part{index}"
        part.write_bytes(chunk)
        parts.append({"file": part.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    index_path = out_dir / f"{name}.json"
    index_path.write_text(json.dumps({
        "model": model_name,
        "fp16_file": f"{name}{FP16_SUFFIX}",
        "sha256": digest,
        "bytes": len(data),
        "parameters": int(sum(v.numel() for v in state.values() if torch.is_tensor(v))),
        "parts": parts,
        "source": {"file": str(manifest.checkpoint_path(entry)), "sha256": entry.sha256},
        "manifest": Path(manifest.path).read_text(),
    }, indent=1))
    print(f"{index_path}: {len(parts)} part(s), {len(data) / 2**20:.1f} MiB in fp16, sha256 {digest[:16]}")
    return index_path


def part_size_mb(text: str) -> float:
    """``--part-mb``: a size in MiB of at least one byte (parts of 0 bytes would never end)."""
    value = positive(text)
    if int(value * 2**20) < 1:
        raise argparse.ArgumentTypeError(f"expected at least one byte (1e-6 MiB), got {text}")
    return value


def check_index(index, index_path: Path) -> None:
    """Refuse, in one line, an index that lacks a key ``split`` writes or names a file outside its own
    folder (parts are read beside the index; the fp16 file and the model's are written in the weights folder)."""
    keys = ("parts", "sha256", "fp16_file", "model", "manifest")
    missing = [key for key in keys if not isinstance(index, dict) or key not in index]
    if missing or not isinstance(index["parts"], list) or not all(
            isinstance(part, dict) and {"file", "sha256"} <= part.keys() for part in index["parts"]):
        raise SystemExit(f"ERROR: {index_path}: not an index written by 'gpu_weights.py split' "
                         f"(missing {', '.join(missing) or 'a part entry with file and sha256'})")
    names = [part["file"] for part in index["parts"]] + [index["fp16_file"], f"{index['model']}.safetensors"]
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise SystemExit(f"ERROR: {index_path}: file name {name!r} is not a plain name in one folder")


def join(index_path: Path, weights_dir: Path) -> Path:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"ERROR: {index_path}: cannot read the index ({getattr(exc, 'strerror', None) or exc})")
    check_index(index, index_path)
    chunks = []
    for part in index["parts"]:
        try:
            chunk = (index_path.parent / part["file"]).read_bytes()
        except OSError as exc:
            raise SystemExit(f"ERROR: {index_path.parent / part['file']}: cannot read this part ({exc.strerror or exc}); "
                             "every part the index lists must lie beside it")
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise SystemExit(f"ERROR: {part['file']}: sha256 differs from the index (damaged or another run's part)")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise SystemExit(f"ERROR: {index_path}: the joined parts' sha256 differs from the index")
    weights_dir.mkdir(parents=True, exist_ok=True)
    # The fp16 file and the export's manifest are only steps to the fp32 weights folder: written under
    # hidden partial names and removed whatever happens (nothing reads them afterwards).
    fp16_path = partial_path(weights_dir / index["fp16_file"])
    exported = partial_path(weights_dir / "exported-manifest.yaml")
    try:
        fp16_path.write_bytes(data)
        exported.write_text(index["manifest"])
        manifest = load_manifest(exported)
        state = load_state_dict(fp16_path, index["sha256"])
        restored = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        checkpoint = f"{index['model']}.safetensors"
        sha = save_weights(restored, weights_dir / checkpoint)
        # The manifest of the export, its entry pointing at the fp32 tensors restored from fp16.
        entry = dataclasses.replace(manifest.models[index["model"]], file=checkpoint, sha256=sha)
        path = write_manifest(Manifest(models={index["model"]: entry}, default=index["model"]),
                              weights_dir / "manifest.yaml")
    finally:
        remove_path(fp16_path)
        remove_path(exported)
    print(f"{path}: sha256 verified ({index['sha256'][:16]}, {len(index['parts'])} part(s)); "
          f"{checkpoint} restored to fp32 (sha256 {sha[:16]})")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("split", help="fp16 parts of an export's default model, with an index")
    s.add_argument("export_dir", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--name", default="gpu_weights")
    s.add_argument("--part-mb", type=part_size_mb, default=15.0,
                   help="largest part in MiB, above 0 (a device call returns <= 16)")
    j = commands.add_parser("join", help="check and reassemble the parts into a weights folder")
    j.add_argument("index", type=Path, help="NAME.json written by split, beside its parts")
    j.add_argument("-o", "--weights-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            split(args.export_dir, args.out_dir, args.name, args.part_mb)
        else:
            join(args.index, args.weights_dir)
    except LsmsegError as exc:  # no export there, a checkpoint whose sha256 differs: one line
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
