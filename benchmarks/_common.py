"""Shared by the benchmark scripts: the model under test, child-process runs, Dice, tables.

Every variant runs in its own Python process so that its peak RSS (VmHWM) is its own; the
parent only prepares inputs, collects the children's JSON and prints tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from lsmseg.realdata import real_data_root  # noqa: E402

REAL_DATA = real_data_root()  # LSMSEG_DATA, else ../shared/data/real beside the checkout

# The shipped model's architecture (training/configs/general_finetune.yaml).
MODEL = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24], "roi": [32, 64, 64]}


def model_and_config(weights: str | None):
    """(model, ModelConfig, InferenceSettings, description): shipped weights if named, else random."""
    import torch

    from lsmseg.config import InferenceSettings, ModelConfig, from_dict
    from lsmseg.model import build_model

    if weights:
        from lsmseg.weights import load_manifest, load_model, resolve_manifest

        manifest = load_manifest(resolve_manifest(weights))
        name, entry = manifest.entry_for(None)
        # The engines are compared, not the clean-up: MONAI has no component removal, so none here.
        settings = dataclasses.replace(entry.inference, min_component_voxels=0)
        return load_model(manifest, entry), entry.model, settings, f"weights '{name}' from {manifest.path}"
    torch.manual_seed(0)
    config = from_dict(ModelConfig, MODEL)
    return build_model(config).eval(), config, InferenceSettings(), "random weights (seed 0), shipped architecture"


def wide_field(work: Path, organ: tuple[int, int, int], field: tuple[int, int, int]) -> dict:
    """A vessel phantom organ centred in a field of its own background noise (a whole-organ scan's
    field of view is wider than the organ), written to ``work`` as ``wide.tif`` and ``wide_label.tif``.

    Args:
        work: the folder to write to.
        organ: the phantom's shape (z, y, x); its z is the field's.
        field: the field of view's shape.

    Returns:
        ``name``, ``input`` and ``label`` (paths), ``dark`` (the fraction outside the tissue).
    """
    from lsmseg import io
    from lsmseg.synth.phantom import make_phantom

    small = make_phantom("vessels", organ, seed=3)
    rng = np.random.default_rng(0)
    image = rng.choice(small.image[~small.tissue], field).astype(small.image.dtype)  # its own noise
    label = np.zeros(field, bool)
    tissue = np.zeros(field, bool)
    y0, x0 = (field[1] - organ[1]) // 2, (field[2] - organ[2]) // 2
    inner = (slice(None), slice(y0, y0 + organ[1]), slice(x0, x0 + organ[2]))
    image[inner], label[inner], tissue[inner] = small.image, small.label > 0, small.tissue
    io.write_volume(image, work / "wide.tif")
    io.write_volume(label.astype(np.uint8), work / "wide_label.tif")
    dark = 1.0 - float(tissue.mean())
    name = f"phantom organ {'x'.join(map(str, organ))} in a {'x'.join(map(str, field))} field ({dark:.0%} dark)"
    return {"name": name, "input": str(work / "wide.tif"), "label": str(work / "wide_label.tif"), "dark": dark}


def peak_rss_mb() -> float:
    """This process's peak resident memory, from /proc (VmHWM).

    Not ``ru_maxrss``: Linux carries it across fork+exec, so a child would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_child(script: Path, spec: dict, timeout: float = 3600) -> dict:
    """Run ``script --child SPEC_JSON`` in a fresh interpreter; return the JSON it prints last.

    The child's error output goes straight to this process's, as it is written: a run cut short by
    a time limit (a device call) still shows where each child was."""
    # The checkout's src first, the caller's path kept (a device call installs the packages into one).
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(spec.get("threads", 2)))
    sys.stderr.flush()
    result = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{spec.get('variant')} failed (exit {result.returncode}; its error output is above)")
    return json.loads(result.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    a, b = a.astype(bool), b.astype(bool)
    if where is not None:
        a, b = a[where], b[where]
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def machine() -> str:
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        # The vector extensions set how fast OpenVINO's kernels run; machines named alike differ in them.
        flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
        cpu += f" ({vector})" if vector else ""
    except (OSError, StopIteration):
        cpu = platform.processor()
    gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"load average at start {os.getloadavg()[0]:.1f}")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table: columns are (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Wall-clock and CPU seconds (user + system, all threads) of a block.

    On a shared machine wall time swings with other people's load; CPU time much less.
    """

    def __enter__(self):
        self.start, self.cpu_start = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu = cpu_seconds() - self.cpu_start
