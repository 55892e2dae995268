"""Settings as validated dataclasses, loaded from YAML with strict checks.

Unknown keys and wrong types are refused with a message naming the file and the key, before any
work starts: a typo in a config must never silently fall back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .errors import ConfigError, single_line
from .normalise import UPPER_TAILS
from .structures import known_structure, unknown_structure

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples etc."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types.

    Args:
        cls: the dataclass (nested dataclasses, tuples, literals and unions are checked too).
        data: the mapping, e.g. parsed YAML.
        where: what the mapping is (a file and key path), the start of every error message.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:  # said as a key, not as the constructor's positional argument
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where}: {exc}") from exc
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from exc
    return obj


def plain(value):
    """A value as plain YAML- and JSON-friendly data (dataclasses become mappings, tuples lists, paths strings)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def to_dict(obj) -> dict:
    """A dataclass as plain YAML-friendly data (tuples become lists, paths strings)."""
    return plain(obj)


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({single_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@dataclass
class ModelConfig:
    """Swin UNETR hyper-parameters; travels from a training config into the weights manifest."""

    in_channels: int = 1
    out_channels: int = 1
    feature_size: int = 24
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    use_v2: bool = True
    roi: tuple[int, int, int] = (64, 64, 64)
    drop_path_rate: float = 0.0
    use_checkpoint: bool = False

    def __post_init__(self):
        if any(r % 32 or r <= 0 for r in self.roi):
            raise ValueError(f"roi {tuple(self.roi)} must be positive multiples of 32 (Swin UNETR downsamples 5 times)")
        if all(r == 32 for r in self.roi):
            # The 1/32 bottleneck would be a single voxel, where instance normalisation is undefined.
            raise ValueError(f"roi {tuple(self.roi)} is too small: at least one axis must be 64 or more")
        if self.feature_size % 12:
            raise ValueError(f"feature_size {self.feature_size} must be a multiple of 12")
        if len(self.depths) != len(self.num_heads):
            raise ValueError("depths and num_heads must have the same length")
        if not 0.0 <= self.drop_path_rate < 1.0:  # a probability of dropping a block's path
            raise ValueError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")


PER_STRUCTURE_FIELDS = ("threshold", "min_component_voxels", "split_touching", "mirror_axes", "intensity_floor",
                        "input_scale")
# Test-time rescaling factors allowed (InferenceSettings.input_scale): the model trained with zoom 0.8-1.25.
INPUT_SCALE_RANGE = (0.25, 4.0)


def input_scale_factors(scale: float | typing.Sequence[float]) -> tuple[float, float, float]:
    """An ``input_scale`` (one factor, or three: z, y, x) as its three per-axis factors."""
    return tuple(float(f) for f in scale) if isinstance(scale, (list, tuple)) else (float(scale),) * 3


def input_scale_text(scale: float | typing.Sequence[float]) -> str:
    """An ``input_scale`` as a command line takes it (logs, JSON keys): ``1.5``, or ``1.5,1.0,1.0`` per axis
    (z, y, x); each factor as ``str(float)`` writes it: exact, and one scale keyed as earlier records key it (``2.0``)."""
    return ",".join(str(float(f)) for f in input_scale_factors(scale)) if isinstance(scale, (list, tuple)) \
        else str(float(scale))


def checked_input_scale(value, what: str = "input_scale",
                        written: str | None = None) -> float | tuple[float, float, float]:
    """``value`` as :attr:`InferenceSettings.input_scale` holds it: one float, or three (z, y, x) when
    they differ (three equal factors are one: (1, 1, 1) is the volume's own grid, exactly as 1).

    Raises:
        ValueError: not one number or three, or a factor outside :data:`INPUT_SCALE_RANGE`; names
            ``what`` and the value as ``written`` (default: its own text).
    """
    value = value.tolist() if hasattr(value, "tolist") else value  # numpy arrays and scalars: plain numbers
    factors = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(factors) not in (1, 3) or any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in factors):
        raise ValueError(f"{what} {written or repr(value)} must be one number or three (z, y, x)")
    low, high = INPUT_SCALE_RANGE
    if not all(low <= f <= high for f in factors):  # NaN fails too
        raise ValueError(f"{what} {written or input_scale_text(value)} must lie within {low:g}-{high:g}"
                         + (" (each factor)" if len(factors) == 3 else ""))
    factors = [float(f) for f in factors]
    return factors[0] if len(set(factors)) == 1 else tuple(factors)


@dataclass
class InferenceSettings:
    """How a checkpoint is applied: window overlap, blending, threshold, normalisation, spacing, clean-up.

    The window is the model's training ROI on MONAI's grid. Larger windows with an overlap in voxels
    were measured and removed: fewer windows, but 0.016-0.021 less Dice (benchmarks/README.md).
    """

    overlap: float = 0.5  # fraction of the window (MONAI's grid)
    threshold: float = 0.5
    sw_batch_size: int = 4
    blend: typing.Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    # Above the upper percentile: "clip" (saturate at 1) or "log" (1 + ln x); lsmseg.normalise.normalise.
    upper_tail: typing.Literal[UPPER_TAILS] = "clip"
    # Voxel spacing (z, y, x, micrometres) the model was trained at; None: never resample.
    spacing: tuple[float, float, float] | None = None
    spacing_tolerance: float = 0.25  # relative difference below which no resampling is done
    # Connected components (26-connected) smaller than this many voxels are removed from the mask:
    # threshold speckle that hardly moves Dice but dominates the Betti-0 error. 0 keeps everything.
    min_component_voxels: int = 0
    # Touching objects are split apart (seeded watershed of the distance transform, seeds of at least
    # this prominence in voxels; lsmseg.inference.postprocess.split_touching). 0 keeps them merged.
    split_touching: float = 0.0
    # Test-time mirroring (nnU-Net's): every window is also run flipped along each combination of
    # these spatial axes (0 z, 1 y, 2 x) and the logits are averaged: (0, 1, 2) costs 8 passes.
    # The model trained with flips on every axis. () runs each window once.
    mirror_axes: tuple[int, ...] = ()
    # Voxels whose normalised intensity (the network's input: the volume's own percentile range,
    # upper tail as upper_tail) is below this are never foreground; None: no floor. Where labels
    # mark only the brightest voxels (DELiVR's microglia validation and test brains: their median
    # labelled voxel sits at ~2.0), the network's haze around them costs Dice and PQ.
    intensity_floor: float | None = None
    # Test-time rescaling: the input is resampled by this factor on every axis, or by three (z, y, x:
    # anisotropic volumes), trilinear, after any resampling to ``spacing``, before the network, and
    # the logits back to the volume's grid; > 1 enlarges small objects (c-Fos cells with cores of a
    # few voxels). 1: the volume's own grid. Held as one float when the factors are equal.
    input_scale: float | tuple[float, float, float] = 1.0
    # Post-processing and mirroring per structure (the 2026 challenge's names, lsmseg.structures),
    # chosen on the validation split: {structure: {threshold, min_component_voxels, split_touching,
    # mirror_axes, intensity_floor, input_scale}}. Used when a case's structure is named or read from its name's prefix; other
    # cases use the fields above.
    per_structure: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap {self.overlap} must be in [0, 1)")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold} must be in (0, 1)")
        if self.sw_batch_size < 1:
            raise ValueError("sw_batch_size must be >= 1")
        if self.min_component_voxels < 0:
            raise ValueError("min_component_voxels must be >= 0")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= lower < upper <= 100")
        if self.upper_tail not in UPPER_TAILS:
            raise ValueError(f"upper_tail {self.upper_tail!r} must be one of {', '.join(UPPER_TAILS)}")
        if not 0.0 <= self.split_touching < math.inf:  # NaN too
            raise ValueError(f"split_touching {self.split_touching} must be a finite number >= 0")
        if not 0.0 < self.sigma_scale < math.inf:
            # 0 makes MONAI's Gaussian a constant, NaN makes every window's weight NaN (empty masks).
            raise ValueError(f"sigma_scale {self.sigma_scale} must be a finite number > 0")
        if self.spacing is not None and not all(0.0 < s < math.inf for s in self.spacing):
            raise ValueError(f"spacing {tuple(self.spacing)} must be positive and finite (micrometres per voxel)")
        if not 0.0 <= self.spacing_tolerance < math.inf:
            raise ValueError(f"spacing_tolerance {self.spacing_tolerance} must be a finite number >= 0")
        self.input_scale = checked_input_scale(self.input_scale)
        if self.intensity_floor is not None and not math.isfinite(self.intensity_floor):
            raise ValueError(f"intensity_floor {self.intensity_floor} must be a finite number (or null: no floor)")
        self.mirror_axes = tuple(int(a) for a in self.mirror_axes)
        if sorted(set(self.mirror_axes)) != list(self.mirror_axes) or not set(self.mirror_axes) <= {0, 1, 2}:
            raise ValueError(f"mirror_axes {self.mirror_axes} must be distinct spatial axes in 0..2, ascending")
        named = {}
        for structure, overrides in self.per_structure.items():
            # A typo'd key would never apply; two keys for one structure would leave which one wins unclear.
            reason = unknown_structure(str(structure))
            if reason is not None:
                raise ValueError(f"per_structure: {reason}")
            if known_structure(structure) in named:
                raise ValueError(f"per_structure: '{named[known_structure(structure)]}' and '{structure}' "
                                 "name the same structure")
            named[known_structure(structure)] = structure
            if not isinstance(overrides, dict):
                raise ValueError(f"per_structure.{structure} must be a mapping")
            unknown = sorted(set(overrides) - set(PER_STRUCTURE_FIELDS))
            if unknown:
                raise ValueError(f"per_structure.{structure}: unknown key '{unknown[0]}' "
                                 f"(allowed: {', '.join(PER_STRUCTURE_FIELDS)})")
            self.for_structure(structure)  # validates the merged values

    def for_structure(self, structure: str | None) -> "InferenceSettings":
        """These settings with ``per_structure[structure]`` applied (unchanged for None or an unlisted one).
        A key may be an alias (``vessels``): it applies to the structure it stands for (``blood_vessel``)."""
        overrides = None
        if structure:
            overrides = self.per_structure.get(structure)
            if overrides is None and known_structure(structure) is not None:
                overrides = next((values for key, values in self.per_structure.items()
                                  if known_structure(key) == known_structure(structure)), None)
        if not overrides:
            return self
        merged = {**to_dict(self), **overrides, "per_structure": {}}
        return from_dict(InferenceSettings, merged, where=f"per_structure.{structure}")


def parse_mirror_axes(text: str) -> tuple[int, ...]:
    """``none``, ``all`` or axis letters (``zyx``, ``yx``) as :attr:`InferenceSettings.mirror_axes`
    (an argparse type: command lines and their environment variables)."""
    text = text.strip().lower()
    if text in ("none", ""):
        return ()
    if text == "all":
        text = "zyx"
    if not set(text) <= set("zyx") or len(set(text)) != len(text):
        raise argparse.ArgumentTypeError(f"expected none, all or distinct letters of zyx, got {text!r}")
    return tuple(sorted("zyx".index(letter) for letter in text))


__all__ = ["ModelConfig", "InferenceSettings", "from_dict", "to_dict", "plain", "load_yaml", "parse_mirror_axes",
           "checked_input_scale", "input_scale_factors", "input_scale_text"]
