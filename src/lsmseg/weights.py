"""Checkpoints and the weights manifest.

Checkpoints are data, not code: they are stored as safetensors (``torch.load`` with
``weights_only=True`` is accepted for ``.pt``/``.pth``), and every file is verified against the
sha256 recorded in ``manifest.yaml`` before a single tensor is used.

``manifest.yaml``::

    format: 1
    default: general                      # entry used when no structure is asked for
    models:
      general:
        file: general.safetensors
        sha256: 3f5a...
        structures: [vessels, cells, nuclei, plaques]
        model: {feature_size: 12, roi: [64, 64, 64], ...}      # lsmseg.config.ModelConfig
        inference: {overlap: 0.5, threshold: 0.45, ...}        # lsmseg.config.InferenceSettings
        validation: {...}                                      # free-form, from training
        provenance: {...}                                      # free-form, from training
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import InferenceSettings, ModelConfig, from_dict, to_dict
from .errors import ConfigError, WeightsError
from .model import build_model

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.yaml"
MANIFEST_FORMAT = 1
# Where to look for weights when none are named: an env override, a Grand Challenge model
# tarball mount, the image's own weights, then the source tree's weights/ folder.
ENV_WEIGHTS = "LSMSEG_WEIGHTS"
ENV_BUNDLED_WEIGHTS = "LSMSEG_BUNDLED_WEIGHTS"  # set by the container image
GRAND_CHALLENGE_MODEL_DIR = Path("/opt/ml/model")
SOURCE_TREE_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


@dataclass
class WeightsEntry:
    """One checkpoint in the manifest."""

    file: str
    sha256: str
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    structures: list[str] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    # Scores on the test split (never used for any choice): reported, per structure.
    test: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


@dataclass
class Manifest:
    models: dict[str, WeightsEntry]
    default: str = "general"
    format: int = MANIFEST_FORMAT
    path: Path | None = None  # where it was loaded from (checkpoint files are relative to it)

    def entry_for(self, structure: str | None = None) -> tuple[str, WeightsEntry]:
        """The entry for ``structure``: a model of that name, one listing it, or the default."""
        if structure:
            if structure in self.models:
                return structure, self.models[structure]
            for name, entry in self.models.items():
                if structure in entry.structures and name != self.default:
                    return name, entry
        if self.default not in self.models:
            raise WeightsError(f"{self.path}: default model '{self.default}' is not in the manifest")
        return self.default, self.models[self.default]

    def checkpoint_path(self, entry: WeightsEntry) -> Path:
        """The entry's file, which must lie in the manifest's own folder (after resolving links)."""
        base = self.path.parent if self.path else Path(".")
        folder = os.path.realpath(base)
        target = os.path.realpath(os.path.join(folder, entry.file))
        if os.path.isabs(entry.file) or not target.startswith(folder + os.sep):
            raise WeightsError(
                f"{self.path}: weights file '{entry.file}' lies outside the manifest's folder; refusing to load it"
            )
        return base / entry.file


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest (a file, or a folder holding ``manifest.yaml``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: weights manifest not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WeightsError(f"{path}: manifest is not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise WeightsError(f"{path}: manifest lists no models")
    try:
        models = {name: from_dict(WeightsEntry, entry, f"{path}:models.{name}") for name, entry in data["models"].items()}
        extra = sorted(set(data) - {"models", "default", "format"})
        if extra:
            raise ConfigError(f"{path}: unknown key '{extra[0]}'")
    except ConfigError as exc:
        raise WeightsError(str(exc)) from exc
    return Manifest(models=models, default=data.get("default", "general"), format=data.get("format", 1), path=path)


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    path = Path(path)
    data = {
        "format": manifest.format,
        "default": manifest.default,
        "models": {name: to_dict(entry) for name, entry in manifest.models.items()},
    }
    tmp = path.with_name(f".partial-{path.name}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def find_manifest(explicit: str | Path | None = None) -> Path:
    """Resolve which manifest to use; raise a clear error when no trained weights are installed."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get(ENV_WEIGHTS):
        candidates.append(Path(os.environ[ENV_WEIGHTS]))
    else:
        candidates.append(GRAND_CHALLENGE_MODEL_DIR)
        if os.environ.get(ENV_BUNDLED_WEIGHTS):
            candidates.append(Path(os.environ[ENV_BUNDLED_WEIGHTS]))
        candidates.append(SOURCE_TREE_WEIGHTS)
    for candidate in candidates:
        manifest = candidate / MANIFEST_NAME if candidate.is_dir() else candidate
        if manifest.is_file():
            return manifest
    if explicit or os.environ.get(ENV_WEIGHTS):
        raise WeightsError(f"{candidates[0]}: weights manifest not found")
    raise WeightsError(
        "no trained weights are installed (looked for manifest.yaml in "
        + ", ".join(str(c) for c in candidates)
        + "); train and export them (see training/README.md) or pass --weights"
    )


def save_weights(state_dict: dict, path: str | Path) -> str:
    """Save a state dict as safetensors (atomically); return its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".partial-{path.name}")
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes 0600: an image's non-root user could not read it
    os.replace(tmp, path)
    return sha256_file(path)


def load_state_dict(path: str | Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Verify ``path`` against ``sha256`` and load its tensors without executing any code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file is missing")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != str(sha256).strip().lower():  # hex digests are case-insensitive
            raise WeightsError(
                f"{path}: checksum mismatch (expected sha256 {sha256[:12]}..., got {actual[:12]}...); "
                "the file is corrupt or was replaced, refusing to use it"
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict")
    return state


def load_model(manifest: Manifest, entry: WeightsEntry, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the entry's model and load its verified weights (strictly: every tensor must match)."""
    path = manifest.checkpoint_path(entry)
    state = load_state_dict(path, entry.sha256)
    try:
        model = build_model(entry.model)
    except Exception as exc:  # e.g. num_heads 0 passes the type checks but not MONAI's constructor
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{manifest.path}: the manifest's model config cannot be built ({message})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{path}: weights do not fit the manifest's model config ({first})") from exc
    return model.to(device).eval()
