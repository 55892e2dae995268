"""Random 3-D patches streamed straight from (possibly huge) volumes.

Volumes are opened with the package's reader in lazy mode (TIFF stacks through tifffile's zarr
view, plane folders plane by plane, zarr natively), so a patch reads only the planes and tiles it
touches; nothing is converted or loaded whole (the paper's TIFF -> PNG step is not needed). Small
volumes (below ``cache_mb``) are held in memory once per worker because re-decoding them for every
patch would cost more than keeping them.

Before any training starts, :func:`prepare_volumes` checks every set (images path exists and holds
volumes, include/exclude names exist and leave some, the ``source`` pattern matches every name) and
every volume (readable, no NaN/Inf voxel, label present with the same shape, label values binary;
some training label with foreground) and computes, once per volume, the
intensity percentiles (:func:`lsmseg.normalise.percentiles`, the same numbers inference uses) and a
sample of foreground positions for foreground/background balanced sampling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lsmseg.config import InferenceSettings
from lsmseg.errors import ConfigError, InputError
from lsmseg.io import expand_inputs, read_volume, volume_name
from lsmseg.io.atomic import write_text
from lsmseg.normalise import normalise, percentiles
from lsmseg_evaluation.labels import check_sparse_values, distinct_values, sparse_masks

from .config import DataConfig, MaskingConfig, PhantomSet, VolumeSet

logger = logging.getLogger(__name__)

# Patch label values: 0 background, 1 foreground, IGNORE unlabelled (sparse sets; the loss skips it).
# Sparse (TRAILMAP) labels are read as evaluation reads them: lsmseg_evaluation.labels.sparse_masks.
IGNORE = 2
MAX_FOREGROUND_SAMPLES = 200_000  # foreground positions kept per volume for balanced sampling
SCAN_VOXELS = 32 * 1024 * 1024  # voxels per chunk when scanning a label


@dataclass
class VolumeRecord:
    """What the sampler needs to know about one volume (picklable, no open file handles)."""

    name: str
    image: Path
    label: Path | None
    shape: tuple[int, int, int]  # native (z, y, x)
    spacing: tuple[float, float, float] | None
    lo: float  # normalisation percentiles, computed once
    hi: float
    factors: tuple[float, float, float]  # native voxels per training voxel along (z, y, x)
    grid: tuple[int, int, int]  # shape on the training grid
    set_index: int
    nbytes: int
    foreground: np.ndarray | None = field(default=None, repr=False)  # (N, 3) native positions
    foreground_fraction: float | None = None
    sparse: bool = False  # sparse label: ``foreground`` holds labelled positions, patches centre on them
    tubular: bool = False
    upper_tail: str = "clip"  # lsmseg.normalise.normalise's, from data.upper_tail

    @property
    def resampled(self) -> bool:
        return any(abs(f - 1.0) > 1e-6 for f in self.factors)

    @property
    def training_spacing(self) -> tuple[float, float, float] | None:
        """Voxel spacing of the training grid (um), when the native spacing is known."""
        if self.spacing is None:
            return None
        return tuple(round(s * f, 6) for s, f in zip(self.spacing, self.factors))


# --------------------------------------------------------------------------------------------
# Phantoms


def ensure_phantoms(spec: PhantomSet) -> VolumeSet:
    """Write the phantoms ``spec`` asks for into ``spec.folder`` (once) and describe them as a set."""
    from lsmseg.synth.phantom import phantom_name, write_phantom

    folder = Path(spec.folder)
    wanted = {
        "kinds": list(spec.kinds),
        "per_kind": spec.per_kind,
        "shape": list(spec.shape),
        "spacing": list(spec.spacing),
        "seed": spec.seed,
    }
    stamp = folder / "phantoms.json"
    names = [phantom_name(kind, spec.seed + i) for kind in spec.kinds for i in range(spec.per_kind)]
    complete = all((folder / sub / f"{name}.tif").is_file() for sub in ("images", "labels") for name in names)
    if not (complete and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        logger.info("writing %d phantoms to %s", len(names), folder)
        for kind in spec.kinds:
            for i in range(spec.per_kind):
                write_phantom(folder, kind, tuple(spec.shape), spec.seed + i, spacing=tuple(spec.spacing))
        folder.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(wanted), stamp)  # whole or absent: a half stamp would pass for a complete set
    return VolumeSet(images=folder / "images", labels=folder / "labels", include=names, weight=spec.weight)


def resolve_sets(data: DataConfig, split: str) -> list[tuple[str, VolumeSet]]:
    """The volume sets of ``split`` ("train" or "validation"), phantoms included, with config keys."""
    sets = [(f"data.{split}[{i}]", s) for i, s in enumerate(getattr(data, split))]
    phantoms = data.train_phantoms if split == "train" else data.validation_phantoms
    if phantoms is not None:
        sets.append((f"data.{split}_phantoms", ensure_phantoms(phantoms)))
    return sets


# --------------------------------------------------------------------------------------------
# Splits by source


def source_of(volume_set: VolumeSet, name: str) -> str:
    """The source of volume ``name`` by the set's ``source`` pattern (the name itself without one).

    Raises:
        ValueError: the pattern does not match ``name``; falling back to the name would make each
            such volume its own source and let the split check pass unnoticed.
    """
    if volume_set.source is None:
        return name
    match = re.search(volume_set.source, name)
    if match is None or match.group(1) is None:
        raise ValueError(f"'{volume_set.source}' does not match volume {name!r}, so its source is unknown; "
                         "fix the pattern (its first group is the source)")
    return match.group(1)


def check_splits(data: DataConfig, where: str) -> dict[str, dict[str, list[str]]]:
    """Refuse a config whose train, validation and test splits share a source; return the splits.

    A source is identified by the folder that holds a volume (symbolic links resolved) and the
    ``source`` pattern of its set, so patches of one scan (``patchvolume_1008_0``,
    ``patchvolume_1008_1``) can never land in two splits. Also refused: one file in two splits under
    any name or path (a single-file set, a symbolic or hard link), two splits reading one folder with
    different ``source`` patterns (their sources could not be compared), and phantoms of one kind and
    seed in both ``train_phantoms`` and ``validation_phantoms``.
    Returns ``{split: {source: [volume names]}}`` for the record.
    """
    seen: dict[tuple[str, str], str] = {}
    files: dict[tuple[int, int], tuple[str, Path]] = {}  # (device, inode) -> (split, path): links resolve here
    patterns: dict[str, dict[tuple[str, str | None], str]] = {}  # folder -> {(split, source pattern): key}
    splits: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "validation", "test"):
        splits[split] = {}
        for i, volume_set in enumerate(getattr(data, split)):
            key = f"data.{split}[{i}]"
            selected = selected_volumes(volume_set, key, where)
            images = Path(volume_set.images)
            for path, name in selected:
                real = path.resolve()
                identity = (real.stat().st_dev, real.stat().st_ino)
                other_split, other = files.setdefault(identity, (split, path))
                if other_split != split:
                    also = "also" if Path(other) == path else f"the same file as {other}"
                    raise ConfigError(f"{where}: {key}: volume {path} is {also} in data.{other_split}; split by "
                                      "source, never inside one")
                # The folder holding the volume, so a single-file set and a set of its folder meet.
                folder = str(real.parent)
                readers = patterns.setdefault(folder, {})  # every set's, not the first's: any may clash
                for (other_split, other_pattern), other_key in readers.items():
                    if other_split != split and other_pattern != volume_set.source:
                        raise ConfigError(f"{where}: {key} and {other_key} read {real.parent} with different source "
                                          f"patterns ({volume_set.source!r} and {other_pattern!r}), so their sources "
                                          "cannot be compared; give every set of one folder the same source")
                readers.setdefault((split, volume_set.source), key)
                source = source_of(volume_set, name)
                owner = seen.setdefault((folder, source), split)
                if owner != split:
                    raise ConfigError(f"{where}: source {source!r} of {images} is in both data.{owner} and "
                                      f"data.{split} (volume {name}); split by source, never inside one")
                splits[split].setdefault(f"{images.name}:{source}", []).append(name)
    _check_phantom_splits(data, where)
    return splits


def _check_phantom_splits(data: DataConfig, where: str) -> None:
    """Refuse validation phantoms drawn with a kind and seed that training phantoms also use (the same
    random structures, so validation would score volumes the model was trained on)."""
    train, validation = data.train_phantoms, data.validation_phantoms
    if train is None or validation is None:
        return
    drawn = {(kind, train.seed + i) for kind in train.kinds for i in range(train.per_kind)}
    shared = sorted((kind, validation.seed + i) for kind in validation.kinds for i in range(validation.per_kind)
                    if (kind, validation.seed + i) in drawn)
    if shared:
        kind, seed = shared[0]
        raise ConfigError(f"{where}: data.validation_phantoms: {kind} phantom seed {seed} is also drawn by "
                          "data.train_phantoms; give validation seeds that training does not use")


# --------------------------------------------------------------------------------------------
# Checking and indexing volumes before training


def selects(volume_set: VolumeSet, name: str) -> bool:
    """Whether a set's ``include``/``exclude`` lists keep the volume ``name``."""
    return (not volume_set.include or name in volume_set.include) and name not in volume_set.exclude


def selected_volumes(volume_set: VolumeSet, key: str, where: str) -> list[tuple[Path, str]]:
    """``(path, name)`` of every volume a set selects, refusing a set that cannot be what was meant.

    Refused, naming the config and ``key``: a missing images path, a folder with no volumes, an
    ``include``/``exclude`` name that is no volume, lists that leave nothing, a ``source`` pattern
    that misses a selected volume.
    """
    images = Path(volume_set.images)
    if not images.exists():
        raise ConfigError(f"{where}: {key}.images: {images}: no such file or folder")
    paths = expand_inputs([images])
    if not paths:
        raise ConfigError(f"{where}: {key}.images: {images}: no volumes in this folder")
    names = [volume_name(p) for p in paths]
    for list_key in ("include", "exclude"):
        missing = [n for n in getattr(volume_set, list_key) if n not in names]
        if missing:
            raise ConfigError(f"{where}: {key}.{list_key}: no volume named {missing[0]!r} in {images}")
    selected = [(p, n) for p, n in zip(paths, names) if selects(volume_set, n)]
    if not selected:
        raise ConfigError(f"{where}: {key}: include/exclude leave no volume of {images}")
    for _, name in selected:
        try:
            source_of(volume_set, name)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}.source: {exc}") from None
    return selected


def set_volumes(volume_set: VolumeSet, key: str = "data", where: str = "config") -> list[tuple[str, Path, Path | None]]:
    """``(name, image, label)`` of every volume :func:`selected_volumes` selects (and refuses as it
    does, naming ``where`` and ``key``); label None for a set without labels."""
    return [(name, path, _label_path(volume_set, path) if volume_set.labels is not None else None)
            for path, name in selected_volumes(volume_set, key, where)]


def _label_path(volume_set: VolumeSet, image: Path) -> Path:
    """A folder of images pairs with a folder of same-named labels; a single volume with a label volume."""
    labels = Path(volume_set.labels)
    if Path(volume_set.images) != Path(image):  # images named a folder of volumes
        return labels / Path(image).name
    return labels


def _planes_per_chunk(shape: tuple[int, ...]) -> int:
    """How many z-planes make one chunk of a scan (about :data:`SCAN_VOXELS` voxels)."""
    return max(1, SCAN_VOXELS // max(1, shape[1] * shape[2]))


def _z_chunks(data) -> Iterator[tuple[int, np.ndarray]]:
    """``(z0, chunk)`` over a (lazy) volume, a few planes at a time, so a scan never holds it whole."""
    depth, step = int(data.shape[0]), _planes_per_chunk(tuple(int(s) for s in data.shape))
    for z0 in range(0, depth, step):
        yield z0, np.asarray(data[z0 : z0 + step])


def _refuse_non_binary(values: set, label_path: Path) -> None:
    """A dense set's ``label_values: binary``: {0, 1} or {0, 255}, anything else a probable mistake."""
    if not (values <= {0, 1} or values <= {0, 255}):
        shown = ", ".join(str(v) for v in sorted(values)[:6])
        raise InputError(
            label_path,
            f"label values {{{shown}}} are not binary {{0, 1}} or {{0, 255}}; fix the label, set "
            "label_values: nonzero for this set if any non-zero value means foreground, or "
            "label_mode: sparse if it labels only some voxels (0 unlabelled, 1 background, 2 foreground)",
        )


def dense_label(label_path: Path, label_values: str = "binary") -> np.ndarray:
    """A dense set's label, loaded whole, as a foreground mask; its values checked as
    :func:`prepare_volumes` checks them (tuning and the lever scripts read labels through this;
    fine-tuning's validation reads volumes that :func:`prepare_volumes` checked already)."""
    array = read_volume(label_path).load()
    if label_values == "binary":
        _refuse_non_binary(set(distinct_values(array)), label_path)
    return array != 0


def sparse_label(label_path: Path) -> np.ndarray:
    """A sparse set's label, loaded whole as uint8, its values checked as training checks them
    (:func:`lsmseg_evaluation.labels.check_sparse_values`): a copy that casts first would hide them."""
    array = read_volume(label_path).load()
    check_sparse_values(distinct_values(array), label_path)
    return array.astype(np.uint8)


def _scan_label(label_path: Path, data, mode: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Check a label's values chunk by chunk; return sampled foreground positions and the fraction."""
    shape = tuple(int(s) for s in data.shape)
    values: set = set()
    positions, count, labelled = [], 0, 0
    per_chunk = max(1, MAX_FOREGROUND_SAMPLES * _planes_per_chunk(shape) // shape[0])
    for z0, chunk in _z_chunks(data):
        if mode == "binary" and len(values) <= 3:
            values.update(np.unique(chunk).tolist())
            _refuse_non_binary(values, label_path)
        if mode == "sparse":
            check_sparse_values(distinct_values(chunk), label_path)
            foreground, valid = sparse_masks(chunk)
            count += int(np.count_nonzero(foreground))
            labelled += int(np.count_nonzero(valid))
            flat = np.flatnonzero(valid)  # sample labelled positions
        else:
            flat = np.flatnonzero(chunk)
            count += flat.size
        if flat.size > per_chunk:
            flat = rng.choice(flat, per_chunk, replace=False)
        if flat.size:
            zyx = np.stack(np.unravel_index(flat, chunk.shape), axis=1)
            zyx[:, 0] += z0
            positions.append(zyx.astype(np.int32))
    fg = np.concatenate(positions) if positions else np.zeros((0, 3), np.int32)
    if mode == "sparse":
        if not len(fg):
            raise InputError(label_path, "sparse label has no labelled voxels (no 1 background, 2 foreground "
                             "or 3 artifact)")
        return fg, count / labelled  # foreground share of the labelled voxels
    return fg, count / math.prod(shape)


def prepare_volumes(
    data: DataConfig, split: str, need_labels: bool, where: str, seed: int = 0
) -> list[VolumeRecord]:
    """Check and index every volume of ``split``; raise one clear error before training starts."""
    records: list[VolumeRecord] = []
    rng = np.random.default_rng(seed)
    for set_index, (key, volume_set) in enumerate(resolve_sets(data, split)):
        selected = selected_volumes(volume_set, key, where)
        if need_labels and volume_set.labels is None:
            raise ConfigError(f"{where}: {key}.labels is required for fine-tuning and validation")
        if volume_set.labels is not None and not Path(volume_set.labels).exists():
            raise ConfigError(f"{where}: {key}.labels: {volume_set.labels}: no such file or folder")
        for path, name in selected:
            records.append(_index_volume(data, volume_set, set_index, path, name, need_labels, rng))
    if not records:
        raise ConfigError(f"{where}: data.{split} selects no volumes")
    # One empty label is a background-only example; all of them leave nothing to learn (a wrong folder?).
    labelled = [r for r in records if r.label is not None]
    if split == "train" and need_labels and labelled and not any(r.foreground_fraction for r in labelled):
        raise ConfigError(f"{where}: data.{split}: no label has a foreground voxel ({len(labelled)} label(s) "
                          "checked); nothing to learn")
    return records


def _refuse_non_finite(path: Path, data) -> None:
    """Refuse a float image with NaN/Inf voxels, with inference's message (read once, chunk by chunk)."""
    if np.dtype(data.dtype).kind != "f":
        return
    from lsmseg.inference.predictor import non_finite_reason

    bad, first = 0, None
    for z0, chunk in _z_chunks(data):
        finite = np.isfinite(chunk)
        if not finite.all():
            bad += int(finite.size - np.count_nonzero(finite))
            if first is None:
                first = z0 + int(np.argwhere(~finite)[0][0])
    if bad:
        raise InputError(path, non_finite_reason(bad, f" (first at z {first})"))


def _index_volume(data: DataConfig, volume_set: VolumeSet, set_index: int, path: Path, name: str,
                  need_labels: bool, rng: np.random.Generator) -> VolumeRecord:
    volume = read_volume(path, lazy=True)
    spacing = tuple(volume_set.spacing) if volume_set.spacing else volume.spacing
    factors = [1.0, 1.0, 1.0]
    if data.target_spacing is not None:
        if spacing is None:
            raise InputError(path, "voxel spacing unknown, so it cannot be resampled to data.target_spacing; "
                             "set spacing for this set in the config")
        # Inference leaves a volume within its spacing tolerance of the model's as it is; a set
        # that close is trained on its native grid too, or the model would learn it rescaled.
        if not all(abs(s / t - 1.0) <= InferenceSettings.spacing_tolerance for s, t in zip(spacing, data.target_spacing)):
            factors = [t / s for t, s in zip(data.target_spacing, spacing)]
    factors[1] /= data.downscale
    factors[2] /= data.downscale
    grid = tuple(max(1, round(n / f)) for n, f in zip(volume.shape, factors))
    _refuse_non_finite(path, volume.data)
    lo, hi = percentiles(volume.data, data.lower_percentile, data.upper_percentile)
    if hi <= lo:
        logger.warning("%s: constant intensity; its patches will be all zero", path)
    record = VolumeRecord(
        name=name, image=path, label=None, shape=volume.shape, spacing=spacing, lo=lo, hi=hi,
        factors=tuple(factors), grid=grid, set_index=set_index,
        nbytes=int(math.prod(volume.shape) * volume.dtype.itemsize), tubular=volume_set.tubular,
        upper_tail=data.upper_tail,
    )
    if volume_set.labels is not None:
        label_path = _label_path(volume_set, path)
        if not label_path.exists():
            raise InputError(label_path, f"no label for image {path}")
        label = read_volume(label_path, lazy=True)
        if label.shape != volume.shape:
            raise InputError(label_path, f"label shape {label.shape} differs from its image's shape {volume.shape} ({path})")
        record.label = label_path
        mode = "sparse" if volume_set.label_mode == "sparse" else volume_set.label_values
        record.foreground, record.foreground_fraction = _scan_label(label_path, label.data, mode, rng)
        record.sparse = volume_set.label_mode == "sparse"
        if record.foreground_fraction == 0:
            logger.warning("%s: label has no foreground voxels; its patches are all background", label_path)
    elif need_labels:
        raise InputError(path, "no label given for this volume")
    return record


def fingerprint(records: Sequence[VolumeRecord]) -> dict:
    """A digest of the training data: each file's sha256 (or size and listing for folders)."""
    from lsmseg.weights import sha256_file

    def digest(path: Path | None) -> str | None:
        if path is None:
            return None
        path = Path(path)
        if path.is_file():
            return sha256_file(path)
        listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        return "listing:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    volumes = [
        {"name": r.name, "shape": list(r.shape), "image_sha256": digest(r.image), "label_sha256": digest(r.label)}
        for r in records
    ]
    total = hashlib.sha256(json.dumps(volumes, sort_keys=True).encode()).hexdigest()
    for volume, record in zip(volumes, records):  # not part of the digest: settings, not data
        volume["training_spacing"] = list(record.training_spacing) if record.training_spacing else None
    return {"sha256": total, "volumes": volumes}


# --------------------------------------------------------------------------------------------
# Patch extraction


class VolumeCache:
    """Opened volumes of one process (lazy readers, or arrays for small volumes)."""

    def __init__(self, cache_mb: int):
        self.cache_bytes = cache_mb * 1024 * 1024
        self._open: dict[Path, object] = {}

    def get(self, path: Path, nbytes: int):
        if path not in self._open:
            volume = read_volume(path, lazy=True)
            self._open[path] = volume.load() if nbytes <= self.cache_bytes else volume.data
        return self._open[path]


def _sample_positions(n: int, g: int, start: int, count: int) -> np.ndarray:
    """Native coordinates that grid voxels ``start .. start + count - 1`` of an axis of ``n`` voxels
    resized to ``g`` sample: those of torch's ``interpolate(size=..., align_corners=False)``, with which
    inference resizes the whole volume (``lsmseg.inference.predictor._resize``). A patch computed from
    the volume's own scale ``n / g`` lands on inference's grid; resizing each patch's crop on its own
    stretched and shifted it by up to ~1.4 native voxels."""
    scale = np.float32(n) / np.float32(g)
    positions = (np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    return np.clip(positions, 0.0, n - 1)


def _resample_axis(array: np.ndarray, axis: int, positions: np.ndarray, nearest: bool) -> np.ndarray:
    """``array`` sampled at ``positions`` (its own coordinates) along ``axis``: linearly, or the
    nearest voxel (labels with IGNORE, which must never be blended)."""
    last = array.shape[axis] - 1
    if nearest:
        return np.take(array, np.minimum(np.floor(positions + 0.5).astype(np.int64), last), axis=axis)
    below = np.floor(positions).astype(np.int64)
    weight = (positions - below).astype(np.float32)
    above = np.minimum(below + 1, last)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    return np.take(array, below, axis=axis) * (1 - weight) + np.take(array, above, axis=axis) * weight


def read_patch(
    record: VolumeRecord, cache: VolumeCache, corner: Sequence[int], roi: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """A normalised image patch (and binary label) of size ``roi`` on the training grid at ``corner``.

    On a resampled grid, the voxels are those inference computes for the whole volume (normalised,
    then trilinearly resized to the model's spacing); the label is sampled at the same positions
    (dense: interpolated, then >= 0.5; sparse: nearest voxel, so unlabelled stays IGNORE).
    Axes where the volume is shorter than the window are padded with zeros (background after
    normalisation) at a random offset, as a small volume is padded at inference.
    """
    extent = [min(r, g) for r, g in zip(roi, record.grid)]
    native, positions = [], []
    for c, e, g, n in zip(corner, extent, record.grid, record.shape):
        if g == n:
            native.append(slice(c, c + e))
            positions.append(None)
            continue
        where = _sample_positions(n, g, c, e)
        start, stop = int(np.floor(where[0])), min(n, int(np.floor(where[-1])) + 2)
        native.append(slice(start, stop))
        positions.append(where - start)
    native = tuple(native)

    def on_grid(array: np.ndarray, nearest: bool = False) -> np.ndarray:
        for axis, where in enumerate(positions):
            if where is not None:
                array = _resample_axis(array, axis, where, nearest)
        return array

    image = normalise(np.asarray(cache.get(record.image, record.nbytes)[native]), record.lo, record.hi,
                      record.upper_tail)
    image = on_grid(image).astype(np.float32, copy=False)
    label = None
    if record.label is not None:
        raw = np.asarray(cache.get(record.label, record.nbytes)[native])
        if record.sparse:
            foreground, valid = sparse_masks(raw)
            label = on_grid(np.where(valid, foreground, IGNORE).astype(np.float32), nearest=True)
        else:
            label = (on_grid((raw != 0).astype(np.float32)) >= 0.5).astype(np.float32)
    if extent != list(roi):
        before = [int(rng.integers(0, r - e + 1)) for r, e in zip(roi, extent)]
        widths = [(b, r - e - b) for b, r, e in zip(before, roi, extent)]
        image = np.pad(image, widths)
        if label is not None:
            label = np.pad(label, widths, constant_values=IGNORE if record.sparse else 0)
    return image, label


def choose_corner(record: VolumeRecord, roi: Sequence[int], rng: np.random.Generator, foreground: bool) -> list[int]:
    """A window corner on the training grid; around a random foreground voxel when asked."""
    limits = [max(0, g - r) for g, r in zip(record.grid, roi)]
    if foreground and record.foreground is not None and len(record.foreground):
        point = record.foreground[rng.integers(len(record.foreground))]
        corner = []
        for p, n, g, r, limit in zip(point, record.shape, record.grid, roi, limits):
            centre = min(g - 1, max(0, round((p + 0.5) * g / n - 0.5)))  # the grid voxel nearest to p
            corner.append(int(np.clip(centre - rng.integers(0, r), 0, limit)))
        return corner
    return [int(rng.integers(0, limit + 1)) for limit in limits]


def cuboid_mask(roi: Sequence[int], config: MaskingConfig, rng: np.random.Generator) -> np.ndarray:
    """Random cuboids (bool, True = hidden) covering up to ``max_fraction`` of the patch."""
    mask = np.zeros(tuple(roi), dtype=bool)
    total = mask.size
    for _ in range(int(rng.integers(config.count[0], config.count[1] + 1))):
        sizes = [max(1, int(round(r * rng.uniform(*config.size)))) for r in roi]
        corner = [int(rng.integers(0, r - s + 1)) for r, s in zip(roi, sizes)]
        mask[tuple(slice(c, c + s) for c, s in zip(corner, sizes))] = True
        if mask.sum() >= config.max_fraction * total:
            break
    return mask


# --------------------------------------------------------------------------------------------
# Augmentation


def build_augmentation(config, seed: int, roi: Sequence[int] = (64, 64, 64)) -> Callable[..., dict]:
    """MONAI flips, in-plane rotations, zoom, gamma, intensity scale/shift and noise on {"image", "label"}.

    Returns ``augment(sample, pad_label=0)``: the voxels rotation and zoom move in from outside the
    patch are zero in the image and ``pad_label`` in the label (:data:`IGNORE` for sparse sets, whose
    unlabelled voxels must never become background; 0, as :func:`read_patch` pads, for dense ones).
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandZoomd,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            RandFlipd(keys, prob=config.flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=config.flip_prob, spatial_axis=1),
            RandFlipd(keys, prob=config.flip_prob, spatial_axis=2),
            # Quarter turns and small angles in the (y, x) plane only: z is usually coarser.
            # (quarter turns would change the patch shape of a non-square window)
            RandRotate90d(keys, prob=config.rotate90_prob if roi[1] == roi[2] else 0.0, max_k=3, spatial_axes=(1, 2)),
            RandRotated(keys, range_x=math.radians(config.rotate_range_deg), prob=config.rotate_prob,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            # Same factor on every axis, shape kept (crop or zero-pad): unknown spacing of new data.
            # "nearest-exact": torch's plain "nearest" picks floor(i * scale), half a voxel off the image's
            # (i + 0.5) * scale - 0.5 (labels shifted by -0.46 voxels on average over zooms 0.8-1.25).
            RandZoomd(keys, prob=config.zoom_prob, min_zoom=config.zoom_range[0], max_zoom=config.zoom_range[1],
                      mode=("trilinear", "nearest-exact"), padding_mode="constant", keep_size=True),
            RandAdjustContrastd("image", prob=config.gamma_prob, gamma=tuple(config.gamma_range), retain_stats=True),
            RandScaleIntensityd("image", factors=config.scale_factor, prob=config.scale_prob),
            RandShiftIntensityd("image", offsets=config.shift_offset, prob=config.shift_prob),
            RandGaussianNoised("image", prob=config.noise_prob, std=config.noise_std),
        ],
        lazy=False,
    )
    transform.set_random_state(seed=seed % (2**32))

    def augment(sample: dict, pad_label: float = 0.0) -> dict:
        # Rotation and zoom fill with 0: the label travels shifted by one so that filled voxels can be
        # told from background (0 -> 1) and IGNORE (2 -> 3).
        out = transform({**sample, "label": sample["label"] + 1})
        label = out["label"]
        out["label"] = torch.where(label == 0, torch.full_like(label, pad_label), label - 1)
        return out

    return augment


# --------------------------------------------------------------------------------------------
# The stream


class PatchStream(IterableDataset):
    """An endless, seeded stream of patches: {"image", ["label"], ["mask"]} tensors of (1, *roi).

    Each (seed, rank, worker) triple has its own random generator, so a run is reproducible for a
    given number of processes and workers. Sets are drawn by weight, then a volume uniformly.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        roi: Sequence[int],
        seed: int,
        set_weights: Sequence[float],
        foreground_ratio: float = 0.0,
        labels: bool = False,
        masking: MaskingConfig | None = None,
        augment=None,
        rank: int = 0,
        cache_mb: int = 256,
    ):
        self.records = list(records)
        self.roi = tuple(int(r) for r in roi)
        self.seed, self.rank = int(seed), int(rank)
        self.foreground_ratio = foreground_ratio
        self.labels = labels
        self.masking = masking
        self.augment = augment
        self.cache_mb = cache_mb
        by_set: dict[int, list[int]] = {}
        for i, record in enumerate(self.records):
            by_set.setdefault(record.set_index, []).append(i)
        self._sets = sorted(by_set)
        self._members = [by_set[s] for s in self._sets]
        weights = np.array([set_weights[s] for s in self._sets], dtype=np.float64)
        self._set_p = weights / weights.sum()

    def _sample(self, rng: np.random.Generator, cache: VolumeCache, transform) -> dict:
        members = self._members[rng.choice(len(self._sets), p=self._set_p)]
        record = self.records[members[rng.integers(len(members))]]
        # Sparse labels: always centre on a labelled voxel, or most patches would hold no label at all.
        foreground = self.labels and (record.sparse or rng.random() < self.foreground_ratio)
        corner = choose_corner(record, self.roi, rng, foreground)
        image, label = read_patch(record, cache, corner, self.roi, rng)
        sample = {"image": image[None]}
        if self.labels:
            sample["label"] = label[None]
            if transform is not None:
                sample = transform(sample, pad_label=IGNORE if record.sparse else 0.0)
        out = {key: torch.as_tensor(np.asarray(value), dtype=torch.float32) for key, value in sample.items()}
        if self.labels:
            out["tubular"] = torch.tensor(float(record.tubular))
        if self.masking is not None:
            out["mask"] = torch.from_numpy(cuboid_mask(self.roi, self.masking, rng))[None]
        return out

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sequence = np.random.SeedSequence([self.seed, self.rank, worker])
        rng = np.random.default_rng(sequence)
        cache = VolumeCache(self.cache_mb)
        transform = None
        if self.augment is not None:
            transform = build_augmentation(self.augment, int(sequence.generate_state(1)[0]), self.roi)
        while True:
            yield self._sample(rng, cache, transform)


def make_loader(stream: PatchStream, batch_size: int, workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
