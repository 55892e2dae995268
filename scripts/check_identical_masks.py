"""Check that two source trees write bit-identical masks (issue 12: a reshaping changes no output).

    # masks of one tree (run it once per tree; the trees' src/ go first on PYTHONPATH)
    python scripts/check_identical_masks.py predict --tree /tmp/before --out /tmp/masks-before INPUT...
    python scripts/check_identical_masks.py predict --tree . --out ... --options "--output-format zarr" INPUT...
    python scripts/check_identical_masks.py predict --tree . --out /tmp/masks-after INPUT...
    # compare: every mask file's sha256 and array, and the voxel counts
    python scripts/check_identical_masks.py compare /tmp/masks-before /tmp/masks-after

``predict`` runs ``lsmseg predict`` of that tree in a subprocess with the given weights (default:
this checkout's ``weights/manifest.yaml``), so that both trees apply the same verified weights.
``compare`` exits 1 when any mask differs or is missing on one side. Files are compared by sha256
(an OME-TIFF with its random UUID zeroed), volumes also as arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def predict(tree: Path, out: Path, inputs: list[str], weights: Path, extra: list[str]) -> int:
    """``lsmseg predict`` from ``tree``'s own sources into ``out``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in ("src", "training", "evaluation"))
    command = [sys.executable, "-c", "import sys; from lsmseg.cli import main; sys.exit(main())",
               "predict", *inputs, "-o", str(out), "--weights", str(weights), "-q", *extra]
    return subprocess.call(command, env=env)


def _mask_files(folder: Path) -> dict[str, Path]:
    """Masks below ``folder`` by relative path (plane folders and zarr stores by every file inside)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(".provenance.json"):
            found[str(path.relative_to(folder))] = path
    return found


# OME-TIFF writers put a fresh UUID into the OME-XML: two writes of the same mask differ there only.
_OME_UUID = re.compile(rb"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _sha256(path: Path) -> str:
    data = path.read_bytes()
    if path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        data = _OME_UUID.sub(b"urn:uuid:" + b"0" * 36, data)
    return hashlib.sha256(data).hexdigest()


def _volumes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith(".json"))


def compare(before: Path, after: Path) -> int:
    """Every file byte for byte, and every volume as an array (with its foreground count)."""
    sys.path.insert(0, str(HERE / "src"))
    import numpy as np

    from lsmseg.io import read_volume

    a, b = _mask_files(before), _mask_files(after)
    failures = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"MISSING  {name}: only in {before if name in a else after}")
            failures += 1
            continue
        same = _sha256(a[name]) == _sha256(b[name])
        failures += not same
        if not same:
            print(f"DIFFERS  {name} (sha256)")
    for volume in _volumes(before):
        other = after / volume.name
        if not other.exists():
            continue
        x, y = read_volume(volume).load(), read_volume(other).load()
        equal = x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
        failures += not equal
        print(f"{'same' if equal else 'DIFFERS':8} {volume.name}: shape {x.shape}, {int(np.count_nonzero(x))} "
              f"foreground voxels before, {int(np.count_nonzero(y))} after")
    verdict = "all bit-identical" if not failures else f"{failures} difference(s)"
    print(f"{len(a)} file(s) before, {len(b)} after; {verdict}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="write masks with one source tree")
    p.add_argument("--tree", type=Path, required=True, help="repository root whose src/ to run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", type=Path, default=HERE / "weights" / "manifest.yaml")
    p.add_argument("--options", default="", help="more `lsmseg predict` options, one string (e.g. '--block-size 24')")
    p.add_argument("inputs", nargs="+")
    c = sub.add_parser("compare", help="compare two mask folders")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict(args.tree.resolve(), args.out, args.inputs, args.weights, shlex.split(args.options))
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
