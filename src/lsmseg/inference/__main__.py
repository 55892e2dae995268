"""``python -m lsmseg.inference [MANIFEST]``: export every model of the installed (or named) manifest
to ONNX now (the file OpenVINO and ONNX Runtime both run), for its training window (the default
inference window), into the cache (``LSMSEG_CACHE_DIR``), e.g. while building an image, so that no
run pays it. Prints the files. Needs one of the two engines installed."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import EXIT_FAILED, EXIT_OK, LsmsegError, OutputError
from ..weights import load_manifest, resolve_manifest
from .engines import export_dir, installed_exported_engine, writable_folder
from .predictor import Predictor, RunOptions


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m lsmseg.inference``."""
    parser = argparse.ArgumentParser(
        prog="python -m lsmseg.inference",
        description="Export every model of a weights manifest to ONNX (the file OpenVINO and ONNX Runtime both "
        "run) into the cache (env LSMSEG_CACHE_DIR, default ~/.cache/lsmseg), e.g. while building an image, so "
        "that no run pays the export. Prints the exported files. Needs lsmseg[openvino] or lsmseg[onnx].",
    )
    parser.add_argument("manifest", nargs="?", metavar="MANIFEST",
                        help="weights: a manifest, a folder holding one, or a model tarball (default: LSMSEG_WEIGHTS, "
                        "a model at /opt/ml/model, then the installed weights)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the manifest's models; exit code 0, or 1 with one ERROR line (e.g. no weights found, or a
    cache folder this process cannot write)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = resolve_manifest(args.manifest)
        # Else each export would go to a temporary folder no later run looks in: a build that "prefilled"
        # nothing would pass.
        folder = export_dir()
        if not writable_folder(folder):
            raise OutputError(folder, "cannot write the export cache there (set LSMSEG_CACHE_DIR to a writable folder)")
        # Either engine writes the same export; with neither installed, onnxruntime's error names the extras.
        engine = installed_exported_engine() or "onnxruntime"
        for name in load_manifest(manifest).models:
            options = RunOptions(structure=name, progress=False)
            print(Predictor.from_manifest(manifest, device="cpu", engine=engine, options=options).export_engine())
    except (LsmsegError, ValueError) as exc:  # ValueError: no engine installed (resolve_engine names the extras)
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
