"""What every challenge mode shares: where to read and write, which weights, how to serve."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from ..errors import OutputError
from ..weights import GRAND_CHALLENGE_MODEL_DIR, resolve_manifest

logger = logging.getLogger(__name__)

MODES = ("folder", "exec", "invoke")
# Outside the container the invoke server listens on loopback only; the image's invoke stage sets
# LSMSEG_HOST=0.0.0.0 so that the platform can reach it (see docs/security.md).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4743
DEFAULT_INPUT = Path("/input")
DEFAULT_OUTPUT = Path("/output")
# SELMA3D 2026 socket slugs; 2024 used 3d-brain-microscopy -> brain-structure.
DEFAULT_INPUT_SLUG = "light-sheet-3d-microscopy"
DEFAULT_OUTPUT_SLUG = "isolated-biological-structure"


@dataclasses.dataclass
class ChallengeSettings:
    """Where to read and write, which weights, and how to serve; filled from arguments and env."""

    input_dir: Path = DEFAULT_INPUT
    output_dir: Path = DEFAULT_OUTPUT
    input_slug: str = DEFAULT_INPUT_SLUG
    output_slug: str = DEFAULT_OUTPUT_SLUG
    weights: Path | None = None
    structure: str | None = None
    device: str | None = None
    engine: str = "auto"  # lsmseg.inference.engines.ENGINES
    mirror_axes: tuple[int, ...] | None = None  # test-time mirroring; None: the manifest's, per structure
    mask_value: int = 1
    progress: bool = False
    model_dir: Path = GRAND_CHALLENGE_MODEL_DIR
    bundled_weights: Path | None = None
    scratch_dir: Path | None = None  # where a model tarball is extracted (default: the temp dir)
    provenance_dir: Path | None = None  # exec/invoke: provenance JSON goes here, not into /output
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_voxels: int | None = None  # declared-size cap for inputs (None: LSMSEG_MAX_VOXELS or the default)


def resolve_weights(settings: ChallengeSettings) -> Path:
    """The manifest these settings name (:func:`lsmseg.weights.resolve_manifest`'s order)."""
    return resolve_manifest(settings.weights, model_dir=settings.model_dir, bundled=settings.bundled_weights,
                            scratch_dir=settings.scratch_dir)


def load_predictor(settings: ChallengeSettings):
    """Load verified weights once (the slow part of start-up)."""
    from ..allocator import map_large_buffers_for
    from ..inference import Predictor, RunOptions

    options = RunOptions(structure=settings.structure, progress=settings.progress, mask_value=settings.mask_value,
                         max_voxels=settings.max_voxels)
    predictor = Predictor.from_manifest(resolve_weights(settings), device=settings.device, engine=settings.engine,
                                        options=options, mirror_axes=settings.mirror_axes)
    map_large_buffers_for(predictor)  # memory freed between blocks goes back to the system
    return predictor


def ensure_writable(folder: Path) -> None:
    """Fail early, with one line, when masks could not be written at all."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".lsmseg-probe-"):
            pass
    except OSError as exc:
        raise OutputError(
            folder,
            f"output folder is not writable ({exc.strerror or exc}); mount it writable "
            f"(e.g. -v ./out:{folder}) and let the container user (uid {os.getuid()}) write to it",
        ) from exc
