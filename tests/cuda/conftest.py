"""The CUDA checks of issue 13: run on a GPU, skip cleanly without one.

``LSMSEG_CUDA_TESTS_ON_CPU=1`` runs them on the CPU as a stand-in, so that the test code is known to
work before a GPU is lent (``scripts/gpu_check.sh --dry-run``): the device is ``cpu``, the process
group gloo instead of NCCL, half precision bf16 only (CPU autocast in fp16 exists but takes minutes
here), and volumes and windows are cut small. A stand-in pass proves the tests run, not that CUDA works.

``LSMSEG_CUDA_REPORT=FILE``: every test appends what it measured (differences, Dice, devices) to FILE
as one JSON line, so that a device run brings its figures back, not only pass or fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ..conftest import REAL_DATA, REPO

ON_CPU_ENV = "LSMSEG_CUDA_TESTS_ON_CPU"
REPORT_ENV = "LSMSEG_CUDA_REPORT"
SAMPLE = REPO / "sample"
STAND_IN_ROI = (32, 32, 64)  # the stand-in's window: the smallest a Swin UNETR config allows (ModelConfig)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Where the CUDA tests run: the GPU, or the CPU standing in for it."""

    device: torch.device
    stand_in: bool

    @property
    def backend(self) -> str:
        return "gloo" if self.stand_in else "nccl"

    @property
    def half_precisions(self) -> tuple[str, ...]:
        return ("bf16",) if self.stand_in else ("fp16", "bf16")

    def roi(self, roi) -> tuple[int, ...]:
        """The shipped window on the GPU; the smallest window the model config allows on the stand-in."""
        return STAND_IN_ROI if self.stand_in else tuple(roi)

    def crop(self, array: np.ndarray, shape=None) -> np.ndarray:
        """The whole volume on the GPU; its centre, cut to ``shape`` (default: one stand-in window), on the stand-in."""
        shape = shape or STAND_IN_ROI
        if not self.stand_in:
            return array
        starts = [max(0, (n - s) // 2) for n, s in zip(array.shape, shape)]
        return array[tuple(slice(a, a + s) for a, s in zip(starts, shape))]

    def report(self, check: str, **values) -> None:
        """Append one JSON line of measured values to ``$LSMSEG_CUDA_REPORT`` (nothing when unset)."""
        if not os.environ.get(REPORT_ENV):
            return
        line = {"check": check, "device": str(self.device), "stand_in": self.stand_in, **values}
        if self.device.type == "cuda":
            line["gpu"] = torch.cuda.get_device_name(self.device)
        append_report(line)


def append_report(line: dict) -> None:
    """Append ``line`` as one JSON line to ``$LSMSEG_CUDA_REPORT`` (nothing when unset)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(line, default=float) + "\n")


@pytest.fixture(scope="session")
def gpu() -> Gpu:
    """The CUDA device; skips every test that asks for it when there is none (unless the stand-in is asked for)."""
    if torch.cuda.is_available():
        return Gpu(torch.device("cuda", 0), stand_in=False)
    if os.environ.get(ON_CPU_ENV) == "1":
        return Gpu(torch.device("cpu"), stand_in=True)
    pytest.skip(f"no CUDA GPU ({ON_CPU_ENV}=1 runs these tests on the CPU as a stand-in)")


def labelled_volumes(root: Path, limit: int) -> list[tuple[Path, Path]]:
    """Up to ``limit`` (image, label) TIFF pairs under ``root`` (``.../images/X.tif`` with ``.../labels/X.tif``),
    taken one folder at a time so that every folder (data set, split) is represented."""
    folders: dict[Path, list[tuple[Path, Path]]] = {}
    for image in sorted(root.glob("**/images/*.tif")):
        label = image.parent.parent / "labels" / image.name
        if label.is_file():
            folders.setdefault(image.parent, []).append((image, label))
    chosen, queues = [], list(folders.values())
    while queues and len(chosen) < limit:
        for queue in list(queues):
            if len(chosen) < limit:
                chosen.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return chosen


@pytest.fixture(scope="session")
def sample_volumes() -> list[tuple[Path, Path]]:
    return labelled_volumes(SAMPLE, 3)


@pytest.fixture(scope="session")
def real_volumes(gpu) -> list[tuple[Path, Path]]:
    """Real labelled volumes from ``$LSMSEG_DATA`` (on a device: the packed validation split); skip without."""
    found = labelled_volumes(REAL_DATA, 2 if gpu.stand_in else 8) if REAL_DATA.is_dir() else []
    if not found:
        pytest.skip(f"no real labelled volumes under {REAL_DATA} (set LSMSEG_DATA; scripts/gpu_pack_data.py packs them)")
    return found


def pytest_runtest_logreport(report):
    """Every test's outcome and time into ``$LSMSEG_CUDA_REPORT`` as it ends, a failure's text with it: a
    device call cut short by its time limit (pytest prints its summary only at the end) still says which
    test failed, why, and how long each took."""
    if not report.nodeid.startswith("tests/cuda") or not (report.when == "call" or report.failed):
        return
    line = {"check": "outcome", "test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 2)}
    if report.failed:
        line["error"] = report.longreprtext[-3000:]
    append_report(line)
