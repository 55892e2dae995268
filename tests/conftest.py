"""Shared fixtures: tiny models and weights that tests make themselves (never shipped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_ROOTS = [str(REPO / package_root) for package_root in ("src", "training", "evaluation")]
sys.path[:0] = _ROOTS
# Subprocesses (`python -m lsmseg ...`) run this checkout too, not whichever one is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(_ROOTS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
from lsmseg.realdata import real_data_root  # noqa: E402

REAL_DATA = real_data_root()  # LSMSEG_DATA, else ../shared/data/real beside the checkout


def run_lsmseg(*args, cwd=None, env=None, launcher=None) -> subprocess.CompletedProcess:
    """``python -m lsmseg ARGS`` (or ``launcher + ARGS``) in a subprocess of this checkout, output captured.

    Args:
        args: the command line after ``lsmseg`` (converted with ``str``).
        cwd: working folder.
        env: extra environment variables (on top of this process's).
        launcher: the command that replaces ``python -m lsmseg`` (e.g. torchrun's).
    """
    command = (launcher or [sys.executable, "-m", "lsmseg"]) + [str(a) for a in args]
    environment = {**os.environ, **env} if env else None
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=600)


def load_script(name: str):
    """``scripts/NAME.py`` imported as a module (the scripts are files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    import torch

    # Two cores on CI shared by the xdist workers: each worker (and the `lsmseg` subprocesses it
    # starts, through OMP_NUM_THREADS) gets its share. Two workers of two threads each on two cores
    # made OpenMP's spinning threads wait on each other: a forward pass took 0.6-3.6 s instead of
    # ~1.2 s on one thread. A device call (scripts/gpu_check.sh) asks for more with LSMSEG_TEST_THREADS.
    from lsmseg.resources import usable_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    share = max(1, usable_cpus() // workers)
    wanted = int(os.environ.get("LSMSEG_TEST_THREADS") or min(2, share))
    torch.set_num_threads(max(1, min(wanted, torch.get_num_threads())))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


# Whole-pipeline tests that take minutes on two cores: `-m "not slow"` leaves them out (README).
SLOW_MODULES = {"test_training_smoke", "test_shipped_weights", "test_cli_scale", "test_dask", "test_container",
                "test_gpu_check", "test_benchmarks_smoke"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def container_tests_enabled(setting: str | None, have_tools: bool) -> tuple[bool, str]:
    """Whether the container tests run, and why: LSMSEG_CONTAINER_TESTS=1 runs them (build_image.sh
    installs podman/buildah where it can), =0 skips them even where the tools are installed; unset,
    they run exactly when podman and buildah are installed."""
    if setting == "1":
        return True, "LSMSEG_CONTAINER_TESTS=1"
    if setting == "0":
        return False, "LSMSEG_CONTAINER_TESTS=0 turns the container tests off"
    if setting not in (None, ""):
        raise pytest.UsageError(f"LSMSEG_CONTAINER_TESTS must be 0 or 1, got {setting!r}")
    if have_tools:
        return True, "podman and buildah are installed"
    return False, ("container tests need podman and buildah (apt-get install podman buildah runc debootstrap "
                   "uidmap), or LSMSEG_CONTAINER_TESTS=1 to let scripts/build_image.sh install them")


@pytest.fixture(scope="session")
def tiny_model_config():
    from lsmseg.config import ModelConfig

    return ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), roi=(32, 64, 64))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config):
    import torch

    from lsmseg.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_config).eval()


def lever_config(folder: Path) -> Path:
    """A lever script's fine-tuning config over ``folder``'s ``train`` and ``validation`` (images/ and
    labels/, written by the caller; validation as cfos_neuron) and a test split of unreadable files:
    a run that read the test split would fail."""
    for kind in ("images", "labels"):
        (folder / "test" / kind).mkdir(parents=True)
        (folder / "test" / kind / "cells_4.tif").write_text("not a TIFF")
    sets = {split: f"    - images: {folder / split / 'images'}\n      labels: {folder / split / 'labels'}\n"
            for split in ("train", "validation", "test")}
    config = folder / "config.yaml"
    config.write_text(f"name: t\noutput: {folder / 'run'}\ndata:\n  train:\n{sets['train']}  test:\n{sets['test']}"
                      f"  validation:\n{sets['validation']}      structure: cfos_neuron\n")
    return config


def make_weights(folder: Path, model_config, model=None, threshold: float = 0.5, **inference) -> Path:
    """Write a safetensors checkpoint and manifest for ``model`` into ``folder``; return the manifest."""
    import torch

    from lsmseg.config import InferenceSettings
    from lsmseg.model import build_model
    from lsmseg.weights import Manifest, WeightsEntry, save_weights, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    if model is None:
        torch.manual_seed(0)
        model = build_model(model_config)
    sha = save_weights(model.state_dict(), folder / "general.safetensors")
    entry = WeightsEntry(
        file="general.safetensors",
        sha256=sha,
        model=model_config,
        inference=InferenceSettings(threshold=threshold, **inference),
        structures=["vessels", "cells", "nuclei"],
        provenance={"note": "test weights made by the test suite"},
    )
    return write_manifest(Manifest(models={"general": entry}), folder / "manifest.yaml")


@pytest.fixture
def tiny_weights(tmp_path, tiny_model_config, tiny_model):
    return make_weights(tmp_path / "weights", tiny_model_config, tiny_model)


@pytest.fixture
def real_data():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (set LSMSEG_DATA)")
    return REAL_DATA
