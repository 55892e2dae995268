"""What a run returns: typed results, and the provenance record built in one place.

:class:`BlockStats` counts one volume's windows (run, or skipped as background) as its blocks are
computed, in one process or on dask workers. :class:`VolumeResult` is what predicting one file gave:
the mask and its provenance record, or the one-line error. :func:`provenance_record` builds the JSON
written beside every mask.
"""

from __future__ import annotations

import math
import os
import platform
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..io import Volume
from .blocks import Block, BlockPlan
from .foreground import Background


@dataclass
class BlockStats:
    """Window and block counts of one volume, for its provenance record.

    Created with :meth:`start` from the volume's plan, then :meth:`count`-ed block by block.
    """

    blocks: int
    block_size: tuple[int, ...]
    windows: int
    background: Background | None = None
    window_runs: int = 0  # windows the network ran (a window straddling blocks may run in each)
    windows_reused: int = 0  # windows a block took from the window cache instead of running them
    skipped: set[int] = field(default_factory=set)  # global ids of skipped windows (a window spans blocks)
    scheduler: str | None = None  # "dask" when the blocks ran on dask workers
    workers: int | None = None

    @classmethod
    def start(cls, plan: BlockPlan, background: Background | None, **extra) -> "BlockStats":
        """Counts for a volume of ``plan`` with ``background`` (None: no skipping), nothing run yet."""
        return cls(blocks=len(plan.blocks), block_size=tuple(plan.block_size), windows=plan.n_windows,
                   background=background, **extra)

    def count(self, plan: BlockPlan, block: Block, skip: Sequence[bool] | None, reused: int = 0) -> None:
        """Record one computed block: its windows run, those skipped (``skip`` flags, or None) and
        those ``reused`` from the window cache."""
        self.windows_reused += reused
        if skip is None:
            self.window_runs += block.n_windows - reused
            return
        self.window_runs += len(skip) - sum(skip) - reused
        self.skipped.update(i for i, s in zip(plan.window_ids(block), skip) if s)

    @property
    def windows_skipped(self) -> int:
        return len(self.skipped)

    def as_dict(self) -> dict:
        record = {
            "blocks": self.blocks,
            "block_size": list(self.block_size),
            "windows": self.windows,
            "window_runs": self.window_runs,
            "windows_reused": self.windows_reused,
            "windows_skipped": self.windows_skipped,
            "background": self.background.as_dict() if self.background is not None else None,
        }
        if self.scheduler is not None:
            record.update(scheduler=self.scheduler, workers=self.workers)
        return record


@dataclass(frozen=True)
class VolumeResult:
    """What predicting one file gave.

    ``ok`` is True when the mask was written; ``record`` is then its provenance record (also
    written beside it, unless ``provenance_error`` says why not). ``error`` is the one-line reason
    when no mask was written.
    """

    input: str
    output: str
    ok: bool
    error: str | None = None
    record: dict | None = None
    provenance_error: str | None = None

    @classmethod
    def written(cls, record: dict, provenance_error: str | None = None) -> "VolumeResult":
        """A mask written, with its provenance record."""
        return cls(record["input"], record["output"], True, record=record, provenance_error=provenance_error)

    @classmethod
    def failed(cls, input_path, output_path, message: str) -> "VolumeResult":
        """No mask written, for the reason ``message`` (one line)."""
        return cls(str(input_path), str(output_path), False, error=message)


def provenance_record(
    input_path, output_path, volume: Volume, *, parameters: dict, weights: dict, stats: BlockStats,
    foreground: int, timings: dict, resampled_to: Sequence[float] | None = None, postprocess: dict | None = None,
    probabilities: dict | None = None, preview: str | None = None, threads=None,
) -> dict:
    """The provenance JSON of one mask: input, parameters, block counts, weights, versions, timings,
    and when it was finished (``finished``: UTC, ISO 8601, to the second).

    Args:
        input_path: the input volume.
        output_path: the mask.
        volume: the input as read (shape, dtype, spacing).
        parameters: the predictor's parameters (:meth:`Predictor.parameters`).
        weights: where the weights came from (manifest, file, sha256).
        stats: the volume's window counts.
        foreground: foreground voxels in the mask.
        timings: seconds per stage (read, predict, write).
        resampled_to: the spacing the volume was resampled to, if it was.
        postprocess: the post-processing applied (structure, threshold, clean-up).
        probabilities: where the probability map went, if one was written.
        preview: where the preview picture went, if one was written.
        threads: the threads the network ran on where not this process's (dask workers': one
            count, or a list when they differ); default ``torch.get_num_threads()`` here.
    """
    record = {
        "input": str(input_path),
        "input_file": input_fingerprint(input_path),
        "output": str(output_path),
        "ok": True,
        "error": None,
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "spacing_um": list(volume.spacing) if volume.spacing else None,
        "resampled_to_um": list(resampled_to) if resampled_to else None,
        "foreground_fraction": foreground / max(math.prod(volume.shape), 1),
        "parameters": parameters,
        "postprocess": postprocess,
        "blocks": stats.as_dict(),
        "weights": weights,
        "versions": {**versions(), **({"threads": threads} if threads is not None else {})},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # When the mask was made: a copied file loses its modification time, and timings are durations.
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if probabilities is not None:
        record["probabilities"] = probabilities
    if preview is not None:
        record["preview"] = preview
    return record


def provenance_path_for(output_path: str | Path) -> Path:
    """``<output name>.provenance.json`` beside the mask: the full name, so that the records of
    ``a.tif``, ``a.tiff`` and ``a.nii.gz`` in one folder do not overwrite each other."""
    output_path = Path(output_path)
    return output_path.parent / f"{output_path.name}.provenance.json"


def input_fingerprint(input_path) -> dict | None:
    """Size and modification time of an input file, to tell whether the file at its path is still the
    one a mask came from (cheap: a checksum would read the whole volume again); None for a folder
    (zarr store, plane folder), whose files are not walked."""
    try:
        info = os.stat(input_path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    modified = datetime.fromtimestamp(info.st_mtime, timezone.utc).isoformat()
    return {"bytes": info.st_size, "modified": modified}


# Inference engines besides torch (a mask they computed has their numbers), each under the
# distribution names its builds are published as: the module is the same, the name on PyPI is not.
_ENGINE_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                    "onnxruntime-rocm", "onnxruntime-training", "onnxruntime-qnn", "onnxruntime-silicon"),
    "openvino": ("openvino", "openvino-nightly"),
}


def versions() -> dict:
    """Versions of lsmseg and the libraries that decide its numbers (an engine not installed: None)."""
    from importlib.metadata import PackageNotFoundError, version

    import monai
    import torch

    engines = dict.fromkeys(_ENGINE_DISTRIBUTIONS)
    for engine, distributions in _ENGINE_DISTRIBUTIONS.items():
        for distribution in distributions:
            try:
                engines[engine] = version(distribution)
                break
            except PackageNotFoundError:
                continue
    return {
        "lsmseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "host_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),  # the timings' threads (a container's --cpus lowers them)
        **engines,
    }
