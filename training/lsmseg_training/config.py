"""Training settings as strict dataclasses loaded from YAML (unknown keys and wrong types refused).

Relative data paths in a config are resolved against the current working directory (the repository
root in every documented command). Real data is written ``$LSMSEG_DATA/...``: the folder given by
``--data``, else the ``LSMSEG_DATA`` environment variable, else ``../shared/data/real`` beside the
checkout (:mod:`lsmseg.realdata`).
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lsmseg.config import ModelConfig, from_dict, load_yaml
from lsmseg.normalise import UPPER_TAILS
from lsmseg.synth import KINDS as PHANTOM_KINDS


@dataclass
class VolumeSet:
    """Volumes from one source: a file or a folder of volumes, with same-named labels."""

    images: Path  # a volume (file, plane folder, zarr) or a folder of volumes
    labels: Path | None = None  # folder (or file) of labels with the images' names; needed to fine-tune
    include: list[str] = field(default_factory=list)  # volume names to keep (empty: all)
    exclude: list[str] = field(default_factory=list)  # volume names to leave out (e.g. held out for validation)
    # "binary": labels must be {0, 1} or {0, 255} (anything else is refused as a probable mistake);
    # "nonzero": any non-zero voxel is foreground (for sets known to use another value, e.g. 0/254).
    label_values: typing.Literal["binary", "nonzero"] = "binary"
    spacing: tuple[float, float, float] | None = None  # (z, y, x) um, for files that do not record it
    weight: float = 1.0  # how often this set is sampled relative to the other sets
    # "dense": every voxel is labelled. "sparse": only some are (TRAILMAP's convention, read as
    # lsmseg evaluate --label-scheme sparse reads it: 0 unlabelled, 1 background, 2 foreground,
    # 3 artifact = background, 4 axon edge = unlabelled; other values refused); the loss counts
    # labelled voxels only and patches are centred on labelled voxels.
    label_mode: typing.Literal["dense", "sparse"] = "dense"
    # Regular expression whose first group is a volume's source (scan, animal, study) from its name,
    # e.g. '^patchvolume_(\d+)_' or '^([a-z]+\d{4})_'; splits must not share a source. None: each
    # volume is its own source.
    source: str | None = None
    tubular: bool = False  # thin connected structures (vessels, axons): the clDice loss term applies
    # What the set shows, by the 2026 challenge's names (lsmseg.structures.STRUCTURES): validation
    # tunes post-processing per structure and reports score per structure with its metrics.
    structure: str | None = None

    def __post_init__(self):
        if not 0 < self.weight < math.inf:  # also refuses NaN, which passes `<= 0`
            raise ValueError(f"weight {self.weight} must be positive")
        if self.structure is not None:
            from lsmseg.structures import STRUCTURES

            if self.structure not in STRUCTURES:
                raise ValueError(f"structure {self.structure!r} is not one of {', '.join(STRUCTURES)}")
        if self.source is not None:
            try:
                pattern = re.compile(self.source)
            except re.error as exc:
                raise ValueError(f"source {self.source!r} is not a regular expression ({exc})") from exc
            if pattern.groups < 1:
                raise ValueError(f"source {self.source!r} needs one group (...) that captures the source")
        if self.spacing is not None and not _positive(self.spacing):
            raise ValueError(f"spacing {self.spacing} must be positive")


def _positive(values) -> bool:
    """Whether every value is a positive finite number (NaN passes a plain ``<= 0`` test)."""
    return all(0 < v < math.inf for v in values)


@dataclass
class PhantomSet:
    """Synthetic phantoms (lsmseg.synth) written once into ``folder`` and reused."""

    folder: Path
    kinds: list[str] = field(default_factory=lambda: list(PHANTOM_KINDS))
    per_kind: int = 2
    shape: tuple[int, int, int] = (48, 128, 128)
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    seed: int = 0  # phantom seeds are seed, seed + 1, ... per kind
    weight: float = 1.0

    def __post_init__(self):
        if self.per_kind < 1 or not 0 < self.weight < math.inf:
            raise ValueError("per_kind and weight must be positive")
        from lsmseg.errors import ConfigError
        from lsmseg.synth.phantom import check_phantom_arguments

        # The generator's own checks (kind, shape, seed, spacing range, size), here so that a bad
        # set stops the config before training starts, not when its phantoms are first written.
        try:
            for kind in self.kinds:
                check_phantom_arguments(kind, self.shape, self.seed, self.spacing)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


@dataclass
class DataConfig:
    train: list[VolumeSet] = field(default_factory=list)
    validation: list[VolumeSet] = field(default_factory=list)
    # The test split: never read for training or any choice; listed so that the split is recorded
    # with the run and checked to share no source with train or validation.
    test: list[VolumeSet] = field(default_factory=list)
    train_phantoms: PhantomSet | None = None
    validation_phantoms: PhantomSet | None = None
    # Resample every volume to this voxel spacing (z, y, x um) while sampling; recorded in the
    # manifest so that inference resamples the same way. None: train on the native grids.
    target_spacing: tuple[float, float, float] | None = None
    downscale: float = 1.0  # extra in-plane (y, x) factor; the paper used 1/3
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    # Above the upper percentile: "clip" or "log" (lsmseg.normalise.normalise); recorded in the manifest.
    upper_tail: typing.Literal[UPPER_TAILS] = "clip"
    foreground_ratio: float = 0.5  # fine-tuning: share of patches centred on a foreground voxel
    workers: int = 0  # DataLoader worker processes
    cache_mb: int = 256  # volumes smaller than this are held in memory (per worker); larger ones read lazily

    def __post_init__(self):
        if not 0.0 < self.downscale <= 1.0:
            raise ValueError(f"downscale {self.downscale} must be in (0, 1]")
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio {self.foreground_ratio} must be in [0, 1]")
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower_percentile < upper_percentile <= 100, got "
                             f"{self.lower_percentile}, {self.upper_percentile}")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if self.target_spacing is not None and not _positive(self.target_spacing):
            raise ValueError(f"target_spacing {self.target_spacing} must be positive")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    # autocast dtype with amp: "auto" = bf16 where the GPU has it natively (Ampere on), else fp16 (with a GradScaler)
    amp_dtype: typing.Literal["auto", "bf16", "fp16"] = "auto"

    def __post_init__(self):
        if not 0 <= self.lr < math.inf:  # 0 keeps the starting weights (a check that a run changes nothing)
            raise ValueError(f"lr {self.lr} must be >= 0")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.grad_clip < math.inf):
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0: no clipping)")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass
class MaskingConfig:
    """Random cuboids set to zero in the input (masked self-supervision)."""

    count: tuple[int, int] = (4, 16)  # cuboids per patch, inclusive range
    size: tuple[float, float] = (0.1, 0.35)  # cuboid side as a fraction of the patch side
    max_fraction: float = 0.6  # stop adding cuboids once this share of the patch is masked (the last may overshoot)
    visible_weight: float = 0.1  # L1 weight on the visible voxels (masked voxels weigh 1)

    def __post_init__(self):
        if not 1 <= self.count[0] <= self.count[1]:
            raise ValueError(f"count {self.count} must be 1 <= low <= high")
        if not 0.0 < self.size[0] <= self.size[1] <= 1.0:
            raise ValueError(f"size {self.size} must satisfy 0 < low <= high <= 1")
        if not 0.0 < self.max_fraction <= 1.0 or self.visible_weight < 0:
            raise ValueError("max_fraction must be in (0, 1] and visible_weight >= 0")


@dataclass
class AugmentConfig:
    """MONAI augmentations for fine-tuning (crop and pad happen in the patch sampler)."""

    flip_prob: float = 0.5  # per axis
    rotate90_prob: float = 0.5  # in-plane quarter turns
    rotate_prob: float = 0.2  # small in-plane rotations
    rotate_range_deg: float = 15.0
    scale_prob: float = 0.5
    scale_factor: float = 0.2  # intensity *= 1 + U(-f, f)
    shift_prob: float = 0.5
    shift_offset: float = 0.1  # intensity += U(-o, o)
    noise_prob: float = 0.2
    noise_std: float = 0.05
    # Random zoom of image and label (same factor on every axis, shape kept): robustness to the
    # unknown voxel spacing of challenge cases. 0 disables it.
    zoom_prob: float = 0.0
    zoom_range: tuple[float, float] = (0.8, 1.25)
    # Random gamma (nnU-Net's: the patch rescaled to [0, 1], raised to gamma, rescaled back, its mean
    # and spread kept): robustness to contrast that differs between brains. 0 disables it.
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self):
        if not 0.0 < self.zoom_range[0] <= self.zoom_range[1]:
            raise ValueError(f"zoom_range {self.zoom_range} must satisfy 0 < low <= high")
        if not 0.0 < self.gamma_range[0] <= self.gamma_range[1]:
            raise ValueError(f"gamma_range {self.gamma_range} must satisfy 0 < low <= high")


@dataclass
class ValidationConfig:
    every: int = 100  # steps between validations (0: only at the end)
    overlap: float = 0.25  # sliding-window overlap during training
    # Overlap of the closing threshold sweep of the best and final checkpoints (the exported
    # inference settings); None skips it (thresholds are then tuned after training, e.g. per structure).
    final_overlap: float | None = 0.5
    threshold: float = 0.5
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sw_batch_size: int = 4


@dataclass
class RunConfig:
    """What both pretraining and fine-tuning share."""

    name: str
    output: Path  # run folder: checkpoints, CSV log, run.json
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 4
    epochs: int = 100
    steps_per_epoch: int = 100  # patches are streamed, so an epoch is a fixed number of steps
    checkpoint_every: int = 100  # steps between resumable checkpoints
    log_every: int = 10
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    # Wall-clock budget in seconds for the whole run, resumes included (a checkpoint keeps the seconds
    # trained so far): the run ends (validates, checkpoints, writes) after the first step that finds it
    # spent, even before total_steps (the schedule is not compressed). None: no budget.
    max_seconds: float | None = None
    # A whole trained model to continue from (encoder and decoder): a weights manifest (its default
    # entry, sha256-checked) or a .safetensors file. Fine-tuning from it adapts the shipped model to a
    # lab's data; pretraining from it adapts a trained encoder to new unlabelled data. None: from scratch.
    init: Path | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def _check_common(self):
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError("batch_size, epochs and steps_per_epoch must be positive")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be positive")
        if self.max_seconds is not None and not 0 < self.max_seconds < float("inf"):  # also refuses NaN
            raise ValueError("max_seconds must be positive (or null: no budget)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads {self.threads} must be positive (or null: torch's default)")


@dataclass
class PretrainConfig(RunConfig):
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def __post_init__(self):
        self._check_common()
        if not self.data.train and self.data.train_phantoms is None:
            raise ValueError("data.train lists no volumes to pretrain on")


@dataclass
class FinetuneConfig(RunConfig):
    epochs: int = 2000
    # Encoder weights from `lsmseg pretrain` (None: from scratch). With init too, this encoder
    # replaces init's and init keeps the decoder.
    pretrained: Path | None = None
    min_matched_fraction: float = 0.9  # refuse a pretrained file that fills less of the encoder
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dice_weight: float = 1.0  # loss = dice_weight * Dice + bce_weight * BCE
    bce_weight: float = 1.0
    batch_dice: bool = False  # one Dice over the whole batch instead of a mean of per-patch Dice
    # Soft clDice (Shit et al., CVPR 2021) on the patches of tubular sets: rewards connected centrelines.
    cldice_weight: float = 0.0
    cldice_iterations: int = 5  # soft-skeleton iterations (about the largest radius in voxels)
    # Exponential moving average of the weights, decay per step (0: off; 0.99 averages over ~100 steps):
    # when on, the average is what is validated, kept as best and final, and exported.
    average_decay: float = 0.0
    structures: list[str] = field(default_factory=lambda: ["vessels", "cells", "nuclei", "plaques"])

    def __post_init__(self):
        self._check_common()
        if not self.data.train and self.data.train_phantoms is None:
            raise ValueError("data.train lists no labelled volumes to fine-tune on")
        if not 0.0 < self.min_matched_fraction <= 1.0:
            raise ValueError("min_matched_fraction must be in (0, 1]")
        if self.cldice_weight < 0 or self.cldice_iterations < 1:
            raise ValueError("cldice_weight must be >= 0 and cldice_iterations >= 1")
        if not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"average_decay {self.average_decay} must be in [0, 1) (0: no moving average)")
        for split in ("validation", "test"):
            for volume_set in getattr(self.data, split):
                if volume_set.label_mode == "sparse":
                    raise ValueError(f"data.{split}: sparse labels are for training only (scores need dense labels)")


def load_run_config(cls, path: str | Path, data_root: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Load ``cls`` from YAML; every error names the file and the key.

    Args:
        cls: ``PretrainConfig`` or ``FinetuneConfig``.
        path: the YAML file.
        data_root: what ``$LSMSEG_DATA`` in data paths means (default: :func:`lsmseg.realdata.real_data_root`).
        overrides: ``KEY=VALUE`` settings that replace the file's (:func:`apply_overrides`).
    """
    data = apply_overrides(load_yaml(path), overrides, where=str(path))
    return from_dict(cls, _expand_data_paths(data, data_root), where=str(path))


def apply_overrides(data: dict, overrides: typing.Sequence[str], where: str = "config") -> dict:
    """``data`` with each ``KEY=VALUE`` set: KEY a dotted path (``model.feature_size``), VALUE YAML (``[64, 64, 64]``).

    The result is checked as strictly as the file (an unknown key or a wrong type is refused, naming it).

    Args:
        data: a config's mapping (not modified).
        overrides: the settings, applied in order.
        where: names the config in errors.
    """
    import copy

    import yaml

    from lsmseg.errors import ConfigError, single_line

    data = copy.deepcopy(data)
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: --set {text!r}: expected KEY=VALUE (e.g. model.feature_size=24)")
        *parents, leaf = key.strip().split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: --set {text!r}: {name} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: --set {text!r}: value is not YAML ({single_line(exc)})") from exc
    return data


def _expand_data_paths(node, data_root):
    """``$LSMSEG_DATA/...`` in every ``images``/``labels``/``folder`` string of a config."""
    from lsmseg.realdata import expand_data_path

    if isinstance(node, dict):
        return {key: expand_data_path(value, data_root) if key in ("images", "labels", "folder") and isinstance(value, str)
                else _expand_data_paths(value, data_root) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand_data_paths(value, data_root) for value in node]
    return node


__all__ = [
    "VolumeSet",
    "PhantomSet",
    "DataConfig",
    "OptimConfig",
    "MaskingConfig",
    "AugmentConfig",
    "ValidationConfig",
    "PretrainConfig",
    "FinetuneConfig",
    "load_run_config",
    "apply_overrides",
]
