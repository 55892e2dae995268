"""The predictor: volume in, binary mask out. Every front end (CLI, container, HTTP) calls this.

    predictor = Predictor.from_manifest()                 # verified weights from weights/manifest.yaml
    predictor.predict_files([Path("in/brain01.tif")], Path("out"))

Pipeline: read (lsmseg.io, lazily) -> percentiles on a subsample (lsmseg.normalise) -> blocks
(lsmseg.blocks): for each output block, read and normalise its input region, skip uniformly dark
windows (lsmseg.foreground), run and Gaussian-blend every window of the global grid that touches
the block -> threshold -> the block goes to the writer (TIFF plane by plane, zarr region by region)
-> a provenance JSON beside the mask. In-memory arrays take the same path with one block; volumes
that must be resampled to the model's spacing are resampled in memory. ``lsmseg.distributed``
spreads the same blocks over dask workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import InferenceSettings, ModelConfig, to_dict
from .errors import InputError, LsmsegError, OutputError, ProvenanceError
from .io import (
    Volume, atomic_output, check_declared_size, check_output_space, output_path_for, read_volume,
    refuse_overwriting_inputs, sweep_partials, volume_name, write_mask_blocks,
)
from .model import select_device
from .normalise import normalise, percentiles
from .weights import Manifest, find_manifest, load_manifest, load_model
from .blocks import Block, BlockPlan, accumulate_block, default_block_shape, plan_blocks, prefetched
from .engines import OnnxEngine, model_key, resolve_engine
from .foreground import Background, dark_windows, estimate_background
from .postprocess import open_faces_of, remove_small_components, split_touching
from .probabilities import PROBABILITY_DTYPES, ProbabilityWriter
from .structures import structure_from_name
from .normalise import DEFAULT_MAX_SAMPLES, subsample
from .windows import blend_weights, inference_window

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class Predictor:
    """Applies one Swin UNETR checkpoint to whole volumes.

    Construct it from a model you already have (tests, training validation) or with
    :meth:`from_manifest` (verified weights). ``predict_volume`` works on arrays,
    ``predict_file``/``predict_files`` on paths.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        settings: InferenceSettings | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        resample: bool = True,
        mask_value: int = 1,
        progress: bool = True,
        weights_info: dict | None = None,
        block_size: int | Sequence[int] | None = None,
        skip_background: bool = True,
        prefetch: bool | None = None,
        compile: bool = False,
        structure: str | None = None,
        max_voxels: int | None = None,
        probabilities_dir: str | Path | None = None,
        probability_dtype: str = "uint8",
        engine: str = "auto",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not 1 <= mask_value <= 255:
            raise ValueError(f"mask_value must be in 1..255, got {mask_value}")
        self.device = select_device(str(device) if device else None)
        self.model = model.to(self.device).eval()
        self.model_config = model_config
        self.settings = settings or InferenceSettings()
        self.precision = precision
        self.resample = resample
        self.mask_value = mask_value
        self.progress = progress
        self.weights_info = weights_info or {}
        # Output block edge(s); None: one block for in-memory arrays, default_block_shape for files.
        self.block_size = block_size
        self.skip_background = skip_background
        # Reading the next block in a thread pays when the network runs elsewhere (a GPU); on CPU the
        # network already uses every core, and benchmarks/ measured no gain but more memory.
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.compile = compile
        # The structure whose post-processing (settings.per_structure) applies to every volume;
        # None: read from each volume's name (the 2026 challenge's case prefixes, lsmseg.structures).
        self.structure = structure
        self.max_voxels = max_voxels  # declared-size cap for inputs (None: LSMSEG_MAX_VOXELS or the default)
        # predict_files also writes probability maps here (same names and formats as the masks).
        if probability_dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"probability_dtype must be one of {PROBABILITY_DTYPES}, got {probability_dtype!r}")
        self.probabilities_dir = probabilities_dir
        self.probability_dtype = probability_dtype
        if compile:
            self.model = torch.compile(self.model)
        # ONNX Runtime on CPU where installed (3-4x PyTorch's speed here, same logits); see lsmseg.engines.
        self.engine = resolve_engine(engine, self.device, precision, compile)
        self._onnx = (
            OnnxEngine(self.model, model_key(self.model, self.weights_info.get("sha256")))
            if self.engine == "onnxruntime" else None
        )
        self._background_cache: dict[tuple, torch.Tensor] = {}
        # Voxels in the subsample that percentiles and the background level come from.
        self.sample_voxels = DEFAULT_MAX_SAMPLES
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_manifest(
        cls,
        manifest_path: str | Path | None = None,
        structure: str | None = None,
        device: str | torch.device | None = None,
        **overrides,
    ) -> "Predictor":
        """Load verified weights named by a manifest (default: the installed weights).

        ``overrides`` may set any :class:`InferenceSettings` field (``threshold=0.4``) or any
        constructor argument (``precision``, ``resample``, ``mask_value``, ``progress``).
        """
        manifest: Manifest = load_manifest(find_manifest(manifest_path))
        name, entry = manifest.entry_for(structure)
        setting_names = {f.name for f in dataclasses.fields(InferenceSettings)}
        setting_overrides = {k: v for k, v in overrides.items() if k in setting_names and v is not None}
        other = {k: v for k, v in overrides.items() if k not in setting_names}
        settings = dataclasses.replace(entry.inference, **setting_overrides)
        if setting_overrides and settings.per_structure:  # an explicit setting wins over every structure's
            settings.per_structure = {
                name_: {k: v for k, v in values.items() if k not in setting_overrides}
                for name_, values in settings.per_structure.items()
            }
        target = select_device(str(device) if device else None)
        model = load_model(manifest, entry, target)
        info = {
            "manifest": str(manifest.path),
            "model": name,
            "file": entry.file,
            "sha256": entry.sha256,
            "structures": list(entry.structures),
        }
        logger.info("loaded weights '%s' (%s, sha256 %s...) on %s", name, entry.file, entry.sha256[:12], target)
        return cls(model, entry.model, settings, device=target, weights_info=info, structure=structure, **other)

    # ------------------------------------------------------------------ numerics
    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.model_config.roi)  # type: ignore[return-value]

    def plan(self, shape: Sequence[int], block_size: int | Sequence[int] | None = None) -> BlockPlan:
        """The block plan and window grid for a volume of ``shape`` (window and overlap from the settings)."""
        window = inference_window(shape, self.roi, self.settings.window)
        return plan_blocks(shape, window, self.settings.overlap, block_size, self.settings.overlap_voxels)

    def _autocast(self):
        """Mixed precision where it pays: fp16/bf16 on CUDA by default; on CPU only if asked."""
        kind = self.device.type
        if self.precision == "fp32" or (self.precision == "auto" and kind != "cuda"):
            return contextlib.nullcontext()
        if self.precision == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=kind, dtype=dtype)

    def run_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Model logits (float32, on CPU) for a batch of normalised windows (N, 1, *roi)."""
        if self._onnx is not None:
            return self._onnx(windows)[:, :1]
        with torch.inference_mode(), self._autocast():
            out = self.model(windows.to(self.device, non_blocking=True))
        return out[:, :1].float()

    def sliding_window_logits(self, image: np.ndarray, desc: str | None = None) -> np.ndarray:
        """Gaussian-blended logits of a normalised float32 volume (any size; padded if small).

        The same block-wise engine as for files, with one block unless ``block_size`` was given.
        """
        image = np.asarray(image, dtype=np.float32)
        background = self._background(image) if self.skip_background else None
        plan = self.plan(image.shape, self.block_size)
        logits = np.empty(image.shape, dtype=np.float32)
        for block, block_logits in self.iter_block_logits(plan, image, None, None, background, desc=desc):
            logits[block.out] = block_logits
        return logits

    # ------------------------------------------------------------------ block engine
    def _background(self, normalised_sample_source) -> Background | None:
        """The volume's dark background (from its normalised subsample), or None."""
        return estimate_background(subsample(normalised_sample_source, self.sample_voxels))

    def background_logits(self, level: float, window: Sequence[int] | None = None) -> torch.Tensor:
        """The model's logits for a uniform window (of ``window``, default the ROI) at ``level``.

        What a skipped window contributes.
        """
        window = tuple(int(w) for w in (window or self.roi))
        key = (round(float(level), 6), window)
        if key not in self._background_cache:
            if len(self._background_cache) >= 8:  # one level per volume: keep the cache small
                self._background_cache.pop(next(iter(self._background_cache)))
            window = torch.full((1, 1, *window), key[0], dtype=torch.float32)
            self._background_cache[key] = self.run_windows(window)[0, 0].cpu()
        return self._background_cache[key]

    def load_block(self, plan: BlockPlan, block: Block, source, lo, hi, background, on_raw=None):
        """Read and normalise a block's input region; decide which of its windows are dark."""
        region = plan.read_region(source, block, lo, hi, on_raw=on_raw)
        skip = None
        if background is not None:
            origin = [s.start for s in block.region]
            skip = dark_windows(region, origin, plan.window_corners(block), plan.roi, background)
        return region, skip

    def block_logits(
        self, plan: BlockPlan, block: Block, region: np.ndarray, skip, background, on_windows=None
    ) -> np.ndarray:
        """Blended logits on one block from its (normalised) input region.

        ``on_windows(n)``, if given, is called after every batch of ``n`` windows the network ran
        (progress).
        """
        settings = self.settings
        weights = blend_weights(plan.roi, settings.blend, settings.sigma_scale)
        background_logits = (
            self.background_logits(background.level, plan.roi) if skip is not None and any(skip) else None
        )
        run = self.run_windows if on_windows is None else _counted(self.run_windows, on_windows)
        return accumulate_block(plan, block, region, run, weights, settings.sw_batch_size, skip, background_logits)

    def iter_block_logits(
        self, plan: BlockPlan, source, lo, hi, background: Background | None, desc: str | None = None, on_raw=None
    ):
        """Yield ``(block, logits)`` for every block of ``plan``, z-major; reads overlap compute.

        Fills ``self.last_stats`` with window and block counts (for provenance).
        """
        stats = {
            "blocks": len(plan.blocks),
            "block_size": list(plan.block_size),
            "windows": plan.n_windows,
            "window_runs": 0,
            "windows_skipped": 0,
            "background": background.as_dict() if background is not None else None,
        }
        self.last_stats = stats
        skipped_ids: set[int] = set()
        # Progress inside the volume: windows (run or skipped as background), with an ETA.
        bar = tqdm(
            total=sum(block.n_windows for block in plan.blocks), desc=desc or "volume", unit="window",
            leave=False, disable=not self.progress, dynamic_ncols=True,
        )
        load = lambda block: self.load_block(plan, block, source, lo, hi, background, on_raw)  # noqa: E731
        try:
            for block, (region, skip) in prefetched(plan.blocks, load, enabled=self.prefetch):
                logits = self.block_logits(plan, block, region, skip, background, on_windows=bar.update)
                if skip is not None:
                    bar.update(sum(skip))
                    skipped_ids.update(i for i, s in zip(plan.window_ids(block), skip) if s)
                    stats["window_runs"] += len(skip) - sum(skip)
                else:
                    stats["window_runs"] += block.n_windows
                stats["windows_skipped"] = len(skipped_ids)
                yield block, logits
        finally:
            bar.close()

    # ------------------------------------------------------------------ volumes
    def _target_spacing(self, spacing: Sequence[float] | None) -> tuple[float, ...] | None:
        """The model's spacing if ``spacing`` differs from it beyond tolerance, else None."""
        model_spacing = self.settings.spacing
        if not self.resample or model_spacing is None or spacing is None:
            return None
        ratios = [s / m for s, m in zip(spacing, model_spacing)]
        if all(abs(r - 1.0) <= self.settings.spacing_tolerance for r in ratios):
            return None
        return tuple(model_spacing)

    def predict_logits(self, image, spacing: Sequence[float] | None = None, name: str = "volume") -> np.ndarray:
        """Blended logits on the input grid for a raw (unnormalised) volume."""
        array = np.asarray(image)
        if array.ndim != 3:
            raise InputError(name, f"expected a 3-D volume, got shape {array.shape}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise InputError(name, f"volume contains {bad} NaN/Inf voxel(s); refusing to guess their values")
        lo, hi = percentiles(array, self.settings.lower_percentile, self.settings.upper_percentile, self.sample_voxels)
        normalised = normalise(array, lo, hi)
        target = self._target_spacing(spacing)
        if target is None:
            return self.sliding_window_logits(normalised, desc=name)
        new_shape = [max(1, round(n * s / t)) for n, s, t in zip(array.shape, spacing, target)]
        logger.info("%s: resampling %s at %s um to %s at %s um", name, array.shape, tuple(spacing), tuple(new_shape), target)
        resampled = _resize(normalised, new_shape)
        logits = self.sliding_window_logits(resampled, desc=name)
        return _resize(logits, array.shape)

    def settings_for(self, name: str) -> InferenceSettings:
        """The inference settings for the volume ``name``: its structure's post-processing applied."""
        # A named structure may be one of our aliases ("vessels"): the manifest keys the 2026 names.
        named = structure_from_name(self.structure) or self.structure if self.structure else None
        return self.settings.for_structure(named or structure_from_name(str(name)))

    def predict_volume(self, image, spacing: Sequence[float] | None = None, name: str = "volume") -> np.ndarray:
        """Binary mask (uint8, values {0, 1}) for a raw volume; ``spacing`` in (z, y, x) um.

        ``name`` labels log lines and picks the structure's post-processing (see :meth:`settings_for`).
        """
        if isinstance(image, Volume):
            spacing = image.spacing if spacing is None else spacing
            name = str(image.path)
            image = image.load()
        array = np.asarray(image)
        if array.size and array.dtype.kind in "uif" and _is_constant(array):
            logger.warning("%s: constant intensity, nothing to segment; writing an empty mask", name)
            return np.zeros(array.shape, dtype=np.uint8)
        return self.binary_mask(self.predict_logits(array, spacing, name), settings=self.settings_for(name))

    # ------------------------------------------------------------------ files
    def parameters(self) -> dict:
        return {
            "model_config": to_dict(self.model_config),
            "inference": to_dict(self.settings),
            "device": str(self.device),
            "precision": self.precision,
            "engine": self.engine,
            # ONNX files used per window shape: "exported": false is a cache hit (lsmseg.engines).
            "onnx_models": self._onnx.describe() if self._onnx is not None else None,
            "resample": self.resample,
            "mask_value": self.mask_value,
            "structure": self.structure,
        }

    def prepare(self, volume: Volume, block_size: int | Sequence[int] | None = None,
                case_name: str | None = None) -> "PreparedVolume":
        """Everything decided once per volume before its blocks run: range, background, blocks, settings.

        Reads only a strided subsample of a lazy volume (twice: percentiles, background).
        ``case_name`` picks the structure's post-processing (default: the volume's file name).
        """
        data = volume.data
        lo, hi = percentiles(data, self.settings.lower_percentile, self.settings.upper_percentile, self.sample_voxels)
        constant = hi <= lo and _is_constant_lazy(data)
        background = None
        if self.skip_background and not constant:
            background = estimate_background(normalise(subsample(data, self.sample_voxels), lo, hi))
        size = block_size or self.block_size or default_block_shape(volume.shape)
        plan = self.plan(volume.shape, size)
        return PreparedVolume(volume, lo, hi, background, plan, constant,
                              self.settings_for(case_name or volume.name))

    def check_finite(self, path) -> Callable[[np.ndarray], None]:
        """A check for raw block data: NaN/Inf voxels are bad input, never guessed."""

        def check(raw: np.ndarray) -> None:
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                bad = int(raw.size - np.isfinite(raw).sum())
                raise InputError(path, f"volume contains NaN/Inf voxel(s) ({bad} in one block); refusing to guess their values")

        return check

    def binary_mask(self, logits: np.ndarray, out=None, volume_shape=None,
                    settings: InferenceSettings | None = None) -> np.ndarray:
        """Thresholded logits, touching objects split, small components removed; values {0, 1}.

        ``out``/``volume_shape``: where this block lies in its volume, so that components cut by a
        block border are kept (see :mod:`lsmseg.postprocess`); None for a whole volume.
        ``settings``: the volume's settings (:meth:`settings_for`); default ``self.settings``.
        """
        settings = settings or self.settings
        mask = (logits >= logit(settings.threshold)).astype(np.uint8)
        mask = split_touching(mask, settings.split_touching)
        open_faces = open_faces_of(out, volume_shape) if out is not None else (False,) * 6
        return remove_small_components(mask, settings.min_component_voxels, open_faces)

    def mask_from_logits(self, logits: np.ndarray, out=None, volume_shape=None,
                         settings: InferenceSettings | None = None) -> np.ndarray:
        """:meth:`binary_mask` as the written mask: 0 and ``mask_value``."""
        return self._with_mask_value(self.binary_mask(logits, out, volume_shape, settings))

    def _with_mask_value(self, mask: np.ndarray) -> np.ndarray:
        return mask * np.uint8(self.mask_value) if self.mask_value != 1 else mask

    def iter_mask_blocks(self, prepared: "PreparedVolume", desc: str | None = None, on_logits=None):
        """Yield ``(slices, mask block)`` for a prepared volume, z-major, with ``mask_value``.

        ``on_logits(slices, logits)``, if given, sees each block's logits first (probability maps).
        """
        volume, plan = prepared.volume, prepared.plan
        if prepared.constant:
            logger.warning("%s: constant intensity, nothing to segment; writing an empty mask", volume.path)
            self.last_stats = {"blocks": len(plan.blocks), "block_size": list(plan.block_size), "windows": plan.n_windows,
                               "window_runs": 0, "windows_skipped": 0, "background": None}
            for block in plan.blocks:
                if on_logits is not None:
                    on_logits(block.out, np.full(block.shape, -np.inf, dtype=np.float32))
                yield block.out, np.zeros(block.shape, dtype=np.uint8)
            return
        for block, logits in self.iter_block_logits(
            plan, volume.data, prepared.lo, prepared.hi, prepared.background, desc=desc,
            on_raw=self.check_finite(volume.path),
        ):
            if on_logits is not None:
                on_logits(block.out, logits)
            yield block.out, self.mask_from_logits(logits, block.out, volume.shape, prepared.settings)

    def predict_file(
        self, input_path: str | Path, output_path: str | Path, provenance_path: str | Path | None = None,
        case_name: str | None = None, probabilities_path: str | Path | None = None,
    ) -> dict:
        """Segment one file block by block; write the mask atomically and a provenance JSON beside it.

        The input is read lazily and the mask written as blocks complete, so memory depends on the
        block size, not on the volume. Volumes that must be resampled to the model's spacing are
        the exception: they are resampled (and predicted) in memory.

        Args:
            input_path: the volume.
            output_path: the mask (its suffix picks the format).
            provenance_path: the provenance JSON (default: beside the mask).
            case_name: the name whose structure picks the post-processing (default: the file's
                name), e.g. the challenge's ``image.name``.
            probabilities_path: also write the foreground probability there, block by block, in the
                same format (``self.probability_dtype``: uint8 = round(255 p), or float16).
        """
        input_path, output_path = Path(input_path), Path(output_path)
        timings = {}
        start = time.perf_counter()
        volume = read_volume(input_path, lazy=True, max_voxels=self.max_voxels)
        check_output_space(output_path, volume.shape)
        target = self._target_spacing(volume.spacing)
        if target is not None:  # resampling builds the volume at the model's spacing, in memory
            new_shape = [max(1, round(n * s / t)) for n, s, t in zip(volume.shape, volume.spacing, target)]
            check_declared_size(input_path, new_shape, 4, self.max_voxels, what="resampled volume")
        probabilities = None
        if probabilities_path is not None:
            probabilities = ProbabilityWriter(Path(probabilities_path), volume, self.probability_dtype)
        on_logits = probabilities.put if probabilities is not None else None
        if target is None:
            prepared = self.prepare(volume, case_name=case_name)
            blocks = self.iter_mask_blocks(prepared, desc=volume.name, on_logits=on_logits)
        else:
            logger.info("%s: resampling needs the whole volume in memory", input_path)
            blocks = self._resampled_mask_blocks(volume, case_name, on_logits=on_logits)
        timings["read_s"] = time.perf_counter() - start
        counter = _BlockCounter(blocks)
        start = time.perf_counter()
        try:
            write_mask_blocks(counter, output_path, volume.shape, like=volume)
        except BaseException:
            if probabilities is not None:
                probabilities.abort()
            raise
        if probabilities is not None:
            probabilities.finish()
        total = time.perf_counter() - start
        timings["predict_s"] = counter.seconds
        timings["write_s"] = max(total - counter.seconds, 0.0)
        effective = self.settings_for(case_name or volume.name)
        postprocess = {"structure": self.structure or structure_from_name(case_name or volume.name),
                       "threshold": effective.threshold, "split_touching": effective.split_touching,
                       "min_component_voxels": effective.min_component_voxels}
        described = probabilities.describe() if probabilities is not None else None
        try:
            record = self.write_provenance(
                input_path, output_path, volume, provenance_path, resampled_to=target,
                foreground=counter.foreground, timings=timings, postprocess=postprocess, probabilities=described,
            )
        except LsmsegError as exc:  # the mask is on disk: say so, apart from "no mask written"
            record = self._record(input_path, output_path, volume, target, counter.foreground, timings, postprocess)
            raise ProvenanceError(exc, output_path, record) from exc
        stats = self.last_stats
        logger.info(
            "%s -> %s (%.1f s; %d of %d windows skipped as background)", input_path, output_path,
            sum(timings.values()), stats.get("windows_skipped", 0), stats.get("windows", 0),
        )
        return record

    def write_provenance(self, input_path, output_path, volume: Volume, provenance_path=None, *,
                         resampled_to=None, foreground: int, timings: dict, postprocess: dict | None = None,
                         probabilities: dict | None = None) -> dict:
        """The provenance JSON beside a mask (inputs, parameters, block stats, weights, versions, timings)."""
        record = self._record(input_path, output_path, volume, resampled_to, foreground, timings, postprocess)
        if probabilities is not None:
            record["probabilities"] = probabilities
        write_json(record, Path(provenance_path) if provenance_path else provenance_path_for(output_path))
        return record

    def _record(self, input_path, output_path, volume: Volume, resampled_to, foreground: int, timings: dict,
                postprocess: dict | None = None) -> dict:
        return {
            "input": str(input_path),
            "output": str(output_path),
            "ok": True,
            "error": None,
            "shape": list(volume.shape),
            "dtype": str(volume.dtype),
            "spacing_um": list(volume.spacing) if volume.spacing else None,
            "resampled_to_um": list(resampled_to) if resampled_to else None,
            "foreground_fraction": foreground / max(math.prod(volume.shape), 1),
            "parameters": self.parameters(),
            "postprocess": postprocess,
            "blocks": dict(self.last_stats),
            "weights": self.weights_info,
            "versions": versions(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }

    def _resampled_mask_blocks(self, volume: Volume, case_name: str | None = None, on_logits=None):
        name = case_name or str(volume.path)
        everything = tuple(slice(0, s) for s in volume.shape)
        if on_logits is None:
            mask = self.predict_volume(volume.load(), volume.spacing, name=name)
            yield everything, self._with_mask_value(mask)
            return
        array = volume.load()
        if array.size and array.dtype.kind in "uif" and _is_constant(array):
            logits = np.full(array.shape, -np.inf, dtype=np.float32)
        else:
            logits = self.predict_logits(array, volume.spacing, name=name)
        on_logits(everything, logits)
        yield everything, self._with_mask_value(self.binary_mask(logits, settings=self.settings_for(name)))

    def output_path(self, input_path: str | Path, out_dir: str | Path, output_format: str = "same") -> Path:
        """Where ``input_path``'s mask goes: same name and container, or ``<name>.ome.zarr``."""
        if output_format == "zarr":
            return Path(out_dir) / f"{volume_name(input_path)}.ome.zarr"
        if output_format != "same":
            raise ValueError(f"output format must be 'same' or 'zarr', got {output_format!r}")
        return output_path_for(input_path, out_dir)

    def predict_files(
        self,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        output_paths: Sequence[str | Path] | None = None,
        output_format: str = "same",
    ) -> list[dict]:
        """Segment many files; a failure is one logged line and never stops the others."""
        out_dir = Path(out_dir)
        outputs = list(output_paths) if output_paths else [self.output_path(p, out_dir, output_format) for p in inputs]
        refuse_overwriting_inputs(zip(inputs, outputs))  # before any work: never replace an input
        for folder in {Path(o).parent for o in outputs}:
            sweep_partials(folder)
        probability_dir = Path(self.probabilities_dir) if self.probabilities_dir else None
        results = []
        for input_path, output_path in tqdm(
            list(zip(inputs, outputs)), desc="volumes", unit="vol", disable=not self.progress or len(inputs) < 2
        ):
            try:
                probabilities = probability_dir / Path(output_path).name if probability_dir else None
                results.append(self.predict_file(input_path, output_path, probabilities_path=probabilities))
            except ProvenanceError as exc:
                logger.error("%s", exc)
                results.append(exc.record)
            except LsmsegError as exc:
                logger.error("%s", exc)
                results.append(_failure(input_path, output_path, str(exc)))
            except MemoryError:
                message = f"{input_path}: out of memory while predicting"
                logger.error("%s", message)
                results.append(_failure(input_path, output_path, message))
            except Exception as exc:  # a bug or an unforeseen file: report it, keep going
                message = f"{input_path}: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                logger.error("%s", message)
                logger.debug("traceback", exc_info=True)
                results.append(_failure(input_path, output_path, message))
        return results


# ---------------------------------------------------------------------- helpers


@dataclasses.dataclass
class PreparedVolume:
    """A volume ready for block-wise prediction (see :meth:`Predictor.prepare`)."""

    volume: Volume
    lo: float
    hi: float
    background: Background | None
    plan: BlockPlan
    constant: bool
    settings: InferenceSettings  # with the volume's structure's post-processing applied


class _BlockCounter:
    """Pass blocks through, counting foreground voxels and the time spent producing them."""

    def __init__(self, blocks):
        self.blocks, self.foreground, self.seconds = blocks, 0, 0.0

    def __iter__(self):
        iterator = iter(self.blocks)
        while True:
            start = time.perf_counter()
            try:
                index, block = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            self.foreground += int(np.count_nonzero(block))
            yield index, block


def _counted(run_windows: Callable, on_windows: Callable[[int], object]) -> Callable:
    """``run_windows`` that reports how many windows each call ran."""

    def run(windows: torch.Tensor) -> torch.Tensor:
        out = run_windows(windows)
        on_windows(len(windows))
        return out

    return run


def _is_constant_lazy(data, planes_per_read: int = 16) -> bool:
    """Whether a (possibly lazy) volume holds one value, read a few planes at a time."""
    if isinstance(data, np.ndarray):
        return data.size > 0 and _is_constant(data)
    first = None
    for z in range(0, int(data.shape[0]), planes_per_read):
        slab = np.asarray(data[z : z + planes_per_read])
        if first is None:
            if slab.size == 0:
                return False
            first = slab.flat[0]
            if slab.dtype.kind == "f" and not np.isfinite(first):
                return False
        if not np.all(slab == first):
            return False
    return first is not None


def _is_constant(array: np.ndarray) -> bool:
    first = array.flat[0]
    if array.dtype.kind == "f" and not np.isfinite(first):
        return False
    return bool(np.all(array == first))


def _resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a float volume (used for spacing changes, both ways)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _failure(input_path, output_path, message: str) -> dict:
    return {"input": str(input_path), "output": str(output_path), "ok": False, "error": message}


def provenance_path_for(output_path: str | Path) -> Path:
    """``<output name>.provenance.json`` beside the mask: the full name, so that the records of
    ``a.tif``, ``a.tiff`` and ``a.nii.gz`` in one folder do not overwrite each other."""
    output_path = Path(output_path)
    return output_path.parent / f"{output_path.name}.provenance.json"


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str))
    except OSError as exc:
        raise OutputError(path, f"cannot write: {exc}") from exc
    return path


def versions() -> dict:
    import monai

    return {
        "lsmseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "host_cpus": os.cpu_count(),
    }
