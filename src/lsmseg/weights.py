"""Checkpoints, the weights manifest, and the one resolver of which weights to use.

Checkpoints are data, not code: they are stored as safetensors (``torch.load`` with
``weights_only=True`` is accepted for ``.pt``/``.pth``), and every file is verified against the
sha256 recorded in ``manifest.yaml`` before a single tensor is used.

Which manifest (:func:`resolve_manifest`, for ``lsmseg predict`` and the container alike): the one
named (``--weights`` or ``LSMSEG_WEIGHTS``: a manifest, a folder holding one, or a model tarball);
else a Grand Challenge model mount at ``/opt/ml/model`` (extracted files, or one ``*.tar.gz``
extracted to scratch space); else the image's own weights (``LSMSEG_BUNDLED_WEIGHTS``); else the
source tree's ``weights/``.

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

import atexit
import hashlib
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath

import torch
import yaml

from .config import InferenceSettings, ModelConfig, from_dict, to_dict
from .errors import ConfigError, WeightsError, single_line
from .io import atomic_output, natural_sorted, write_text
from .model import build_model
from .structures import known_structure

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.yaml"
MANIFEST_FORMAT = 1
# Where to look for weights when none are named: an env override, a Grand Challenge model
# tarball mount, the image's own weights, then the source tree's weights/ folder.
ENV_WEIGHTS = "LSMSEG_WEIGHTS"
ENV_BUNDLED_WEIGHTS = "LSMSEG_BUNDLED_WEIGHTS"  # set by the container image
GRAND_CHALLENGE_MODEL_DIR = Path("/opt/ml/model")
SOURCE_TREE_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
MODEL_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


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
    """A weights manifest: its checkpoints by name, and the one used when no structure names another."""

    models: dict[str, WeightsEntry]
    default: str = "general"
    format: int = MANIFEST_FORMAT
    path: Path | None = None  # where it was loaded from (checkpoint files are relative to it)

    def entry_for(self, structure: str | None = None) -> tuple[str, WeightsEntry]:
        """The entry for ``structure``: a model of that name, one listing it, or the default.

        A name is matched as given first, then by the structure it stands for (``vessels``,
        ``Vessels`` and ``blood_vessel`` are one), so a model listing our words is found by the 2026
        name too."""
        if structure:
            if structure in self.models:
                return structure, self.models[structure]
            wanted = known_structure(structure)
            matchers = [lambda name: name == structure]
            if wanted is not None:
                matchers.append(lambda name: known_structure(str(name)) == wanted)
            for same in matchers:
                for name, entry in self.models.items():
                    if name != self.default and (same(name) or any(same(listed) for listed in entry.structures)):
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
    """The SHA-256 of a file, as a hex digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest (a file, or a folder holding ``manifest.yaml``).

    Args:
        path: the manifest (see :func:`resolve_manifest` for tarballs and the installed weights).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: weights manifest not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WeightsError(f"{path}: manifest is not valid YAML ({single_line(exc)})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise WeightsError(f"{path}: manifest lists no models")
    try:
        for name, entry in data["models"].items():
            _drop_removed_settings(entry, f"{path}:models.{name}")
        models = {name: from_dict(WeightsEntry, entry, f"{path}:models.{name}") for name, entry in data["models"].items()}
        extra = sorted(set(data) - {"models", "default", "format"})
        if extra:
            raise ConfigError(f"{path}: unknown key '{extra[0]}'")
    except ConfigError as exc:
        raise WeightsError(str(exc)) from exc
    for name, entry in models.items():  # else refused only at load, as a mismatch against nothing
        if not SHA256_HEX.fullmatch(entry.sha256.strip()):
            raise WeightsError(f"{path}:models.{name}.sha256: {entry.sha256!r} is not a sha256 digest (64 hex digits)")
    fmt, default = data.get("format", MANIFEST_FORMAT), data.get("default", "general")
    if fmt != MANIFEST_FORMAT or isinstance(fmt, bool):  # a newer layout would be misread, not refused
        raise WeightsError(f"{path}: manifest format {fmt!r} is not supported (this lsmseg reads format "
                           f"{MANIFEST_FORMAT})")
    if not isinstance(default, str):
        raise WeightsError(f"{path}: default: expected a model name, got {type(default).__name__} {default!r}")
    return Manifest(models=models, default=default, format=fmt, path=path)


# Inference settings removed since manifests were first written (window larger than the training ROI,
# overlap in voxels: measured to lose Dice). Null meant "the training ROI on MONAI's grid", which is
# now the only behaviour, so older manifests that hold them as null still load.
REMOVED_INFERENCE_SETTINGS = ("window", "overlap_voxels")


def _drop_removed_settings(entry, where: str) -> None:
    inference = entry.get("inference") if isinstance(entry, dict) else None
    if not isinstance(inference, dict):
        return
    for key in REMOVED_INFERENCE_SETTINGS:
        if key in inference:
            if inference[key] is not None:
                raise ConfigError(f"{where}.inference.{key}: {inference[key]!r} is no longer supported (windows are "
                                  "the model's training ROI); remove the key to apply the checkpoint that way")
            del inference[key]


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write ``manifest`` to ``path`` atomically."""
    data = {
        "format": manifest.format,
        "default": manifest.default,
        "models": {name: to_dict(entry) for name, entry in manifest.models.items()},
    }
    return write_text(yaml.safe_dump(data, sort_keys=False), path)


def resolve_manifest(
    explicit: str | Path | None = None, *, model_dir: Path | None = None, bundled: Path | None = None,
    scratch_dir: Path | None = None,
) -> Path:
    """The manifest to load, in the documented order; a clear error when there is none.

    Args:
        explicit: ``--weights``: a manifest file, a folder holding one (up to two levels down), or a
            model tarball; None: ``LSMSEG_WEIGHTS`` if set.
        model_dir: the Grand Challenge model mount (default :data:`GRAND_CHALLENGE_MODEL_DIR`).
        bundled: the image's own weights folder (default: ``LSMSEG_BUNDLED_WEIGHTS`` if set).
        scratch_dir: where a model tarball is extracted (default: the temporary folder).
    """
    named = str(explicit) if explicit else None
    if not explicit and os.environ.get(ENV_WEIGHTS):
        explicit = os.environ[ENV_WEIGHTS]
        named = f"{ENV_WEIGHTS}={explicit}"  # the error names where the path came from
    if explicit:
        found = _manifest_at(Path(explicit), scratch_dir)
        if found is None:
            raise WeightsError(f"{named}: weights manifest not found")
        return found
    model_dir = GRAND_CHALLENGE_MODEL_DIR if model_dir is None else Path(model_dir)
    found = _manifest_at(model_dir, scratch_dir) if model_dir.is_dir() else None
    if found is not None:
        return found
    looked = [f"{model_dir} (manifest.yaml or a model tarball)"]
    from_env = bundled is None and bool(os.environ.get(ENV_BUNDLED_WEIGHTS))
    bundled = Path(os.environ[ENV_BUNDLED_WEIGHTS]) if from_env else bundled
    for folder in (bundled, SOURCE_TREE_WEIGHTS):
        if folder is None:
            continue
        if (folder / MANIFEST_NAME).is_file():
            if bundled is not None and folder is not bundled:  # not the weights it names: say so
                named = f"{ENV_BUNDLED_WEIGHTS}={bundled}" if from_env else str(bundled)
                logger.warning("%s holds no %s; using %s", named, MANIFEST_NAME, folder / MANIFEST_NAME)
            return folder / MANIFEST_NAME
        looked.append(str(folder))
    raise WeightsError(
        "no trained weights are installed (looked in " + ", ".join(looked) + "); train and export them "
        f"(see training/README.md), mount a model at {model_dir}, or pass --weights"
    )


def _manifest_at(path: Path, scratch_dir: Path | None) -> Path | None:
    """The manifest a path names: the file itself, one in the folder (up to two levels down, a
    tarball's top folder), or the one inside a model tarball (in the path, or the folder's only one)."""
    if path.is_file():
        return extract_model_tarball(path, scratch_dir) if path.name.lower().endswith(MODEL_TARBALL_SUFFIXES) else path
    if not path.is_dir():
        return None
    found = _find_manifest_below(path)
    if found:
        return found
    tarballs = natural_sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(MODEL_TARBALL_SUFFIXES))
    if len(tarballs) > 1:
        names = ", ".join(p.name for p in tarballs)
        raise WeightsError(f"{path}: {len(tarballs)} model tarballs ({names}); expected one")
    return extract_model_tarball(tarballs[0], scratch_dir) if tarballs else None


def _find_manifest_below(folder: Path, depth: int = 2) -> Path | None:
    """``folder/manifest.yaml``, else the first one up to ``depth`` folders down (a tarball's top folder)."""
    if (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME
    if depth == 0:
        return None
    for child in natural_sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _find_manifest_below(child, depth - 1)
        if found:
            return found
    return None


def _safe_members(tar: tarfile.TarFile, tarball: Path) -> list[tarfile.TarInfo]:
    """Plain files and folders inside the extraction folder only (no links, devices, ``..``)."""
    members = []
    for member in tar.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise WeightsError(f"{tarball}: refusing to extract '{member.name}' (path outside the archive)")
        if not (member.isfile() or member.isdir()):
            raise WeightsError(f"{tarball}: refusing to extract '{member.name}' (not a plain file or folder)")
        members.append(member)
    return members


def _data_only(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """What tarfile's ``data`` filter does to a plain file or folder: no setuid/setgid/sticky bits,
    no group/other write, owner read/write(/search) kept, and no owner taken from the archive."""
    member = member.replace(deep=False) if hasattr(member, "replace") else member
    base = 0o700 if member.isdir() else 0o600
    member.mode = (member.mode & 0o755) | base
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


_extracted_from: dict[Path, Path] = {}  # a scratch manifest -> the model tarball it came from


def tarball_of(manifest: str | Path) -> Path | None:
    """The model tarball a manifest was extracted from by :func:`extract_model_tarball` in this
    process (its scratch copy is gone after the run, so records name the tarball), else None."""
    return _extracted_from.get(Path(manifest))


def _remove_at_exit(folder: Path, owner_pid: int) -> None:
    """Remove a scratch folder at exit, in the process that made it only (not in a forked child)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def extract_model_tarball(tarball: Path, scratch_dir: Path | None = None) -> Path:
    """Extract a model tarball into a fresh scratch folder; return the manifest it holds.

    The folder is removed when the process exits (every front end that takes a tarball would
    otherwise leave a copy of the model in the temporary folder on every run).

    Args:
        tarball: a ``.tar.gz``, ``.tgz`` or ``.tar`` holding ``manifest.yaml`` and its checkpoints.
        scratch_dir: where the scratch folder is made (default: the temporary folder).
    """
    try:
        target = Path(tempfile.mkdtemp(prefix="lsmseg-model-", dir=scratch_dir))
    except OSError as exc:  # a read-only root without a tmpfs at /tmp: Python's message names no fix
        raise WeightsError(f"{tarball}: no writable temporary folder to extract the model tarball into "
                           f"({single_line(exc)}); mount a writable /tmp (docker run --tmpfs /tmp) or set TMPDIR"
                           ) from exc
    atexit.register(_remove_at_exit, target, os.getpid())
    try:
        with tarfile.open(tarball) as tar:
            members = _safe_members(tar, tarball)
            if hasattr(tarfile, "data_filter"):
                # filter="data" also drops setuid/world-writable modes and owners from the archive.
                tar.extractall(target, members=members, filter="data")  # noqa: S202 - members checked above
            else:  # Python < 3.11.4 (Debian bookworm's 3.11.2, the image's): the same sanitising by hand
                tar.extractall(target, members=[_data_only(m) for m in members])  # noqa: S202
        manifest = _find_manifest_below(target)
        if manifest is None:
            raise WeightsError(f"{tarball}: model tarball holds no {MANIFEST_NAME}")
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)  # no half-extracted model left in scratch space
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            raise WeightsError(f"{tarball}: cannot extract model tarball ({single_line(exc)})") from exc
        raise
    logger.info("extracted model tarball %s to %s", tarball, target)
    _extracted_from[manifest] = Path(tarball).absolute()
    return manifest


def save_weights(state_dict: dict, path: str | Path) -> str:
    """Save a state dict as safetensors (atomically, readable by all); return its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o644)  # safetensors writes 0600: an image's non-root user could not read it
    return sha256_file(path)


def load_state_dict(path: str | Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Verify ``path`` against ``sha256`` and load its tensors without executing any code.

    Args:
        path: a ``.safetensors`` file, or a ``.pt``/``.pth`` loaded with ``weights_only=True``.
        sha256: the expected hex digest; None skips the check (a file the user named directly).
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise WeightsError(f"{path}: not a file (a weights file belongs there)")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file is missing")
    try:
        # One read: the bytes checked are the bytes loaded (a file replaced between two reads is not).
        content = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights ({single_line(exc.strerror or exc)})") from None
    if sha256 is not None:
        actual = hashlib.sha256(content).hexdigest()
        if actual != str(sha256).strip().lower():  # hex digests are case-insensitive
            raise WeightsError(
                f"{path}: checksum mismatch (expected sha256 {sha256[:12]}..., got {actual[:12]}...); "
                "the file is corrupt or was replaced, refusing to use it"
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            return load_safetensors(content)
        state = torch.load(BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as exc:
        # One line: torch's refusals run to several paragraphs (weights_only's advice about pickles).
        detail = single_line(exc)
        if isinstance(exc, pickle.UnpicklingError):
            detail = "not safetensors nor a checkpoint of plain tensors; torch.load(weights_only=True) refused it"
        elif len(detail) > 200:
            detail = detail[:200] + "..."
        raise WeightsError(f"{path}: cannot load weights ({type(exc).__name__}: {detail})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict")
    return state


def load_model(manifest: Manifest, entry: WeightsEntry, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the entry's model and load its verified weights (strictly: every tensor must match).

    Args:
        manifest: the loaded manifest (checkpoint paths are relative to its folder).
        entry: one of its models (:meth:`Manifest.entry_for`).
        device: where the model goes.
    """
    path = manifest.checkpoint_path(entry)
    state = load_state_dict(path, entry.sha256)
    try:
        model = build_model(entry.model)
    except Exception as exc:  # e.g. num_heads 0 passes the type checks but not MONAI's constructor
        message = single_line(exc)[:200] or type(exc).__name__
        raise WeightsError(f"{manifest.path}: the manifest's model config cannot be built ({message})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict"; the second names a tensor.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else type(exc).__name__)
        first = first[:200] + ("..." if len(first) > 200 else "")
        raise WeightsError(f"{path}: weights do not fit the manifest's model config ({first})") from exc
    return model.to(device).eval()
