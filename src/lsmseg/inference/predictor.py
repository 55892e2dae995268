"""The predictor: one model and its inference settings, applied to arrays and to blocks of volumes.

    predictor = Predictor.from_manifest()                  # verified weights (lsmseg.weights)
    mask = predictor.predict_volume(array, spacing=(3, 1, 1))

What a run may change without touching the model (block size, background skipping, mask value,
structure, probability maps, ...) is a :class:`RunOptions`, given apart from the model. Files go
through :mod:`.run` (:func:`.run.predict_files`), which uses the block API here.

Pipeline: percentiles on a subsample (:mod:`lsmseg.normalise`) -> blocks (:mod:`.blocks`): for each
output block, read and normalise its input region, skip uniformly dark windows (:mod:`.foreground`),
run (mirrored and averaged where the structure's settings say) and Gaussian-blend every window of
the global grid that touches the block -> post-process
(:mod:`.postprocess`). In-memory arrays take the same path with one block; volumes that must be
resampled to the model's spacing are resampled in memory. :mod:`lsmseg.distributed` spreads the
same blocks over dask workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import InferenceSettings, ModelConfig, input_scale_factors, input_scale_text, to_dict
from ..errors import InputError, printable
from ..io import Volume
from ..model import autocast_dtype, select_device
from ..normalise import DEFAULT_MAX_SAMPLES, is_constant, normalise, percentiles, subsample
from ..structures import structure_from_name
from .blocks import (DEFAULT_WINDOW_CACHE_BYTES, Block, BlockPlan, WindowCache, accumulate_block, accumulation_device,
                     default_block_shape, grid_stride, plan_blocks, prefetched)
from .engines import OpenVinoEngine, exported_engine, resolve_engine
from .foreground import Background, dark_windows, estimate_background
from .postprocess import open_faces_of, remove_small_components, split_touching
from .probabilities import PROBABILITY_DTYPES
from .results import BlockStats
from .windows import blend_weights

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def logit(p: float) -> float:
    """The log-odds of a probability ``p`` in (0, 1): the logit a probability threshold equals."""
    return math.log(p / (1.0 - p))


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run applies the model, apart from the model and its inference settings.

    Args:
        structure: the structure whose post-processing (the settings' ``per_structure``) applies to
            every volume, and whose manifest entry :meth:`Predictor.from_manifest` loads; None: read
            from each volume's name (the 2026 challenge's case prefixes, :mod:`lsmseg.structures`).
        block_size: output block edge(s) in voxels; None: one block for arrays, blocks of at most
            256^3 voxels for files (:func:`.blocks.default_block_shape`).
        skip_background: blend in the model's answer to a uniform dark window instead of running
            the network on uniformly dark windows (:mod:`.foreground`).
        prefetch: read the next block in a thread while the network runs; None: on CUDA only (on a
            CPU the network already uses every core).
        device_accumulation: on a GPU, blend each block's windows in device memory when its
            accumulators fit there (:func:`.blocks.accumulation_device`); False: on the host, every
            batch's logits copied down first (the way before issue 13; kept for benchmarks).
        window_cache_mb: how much memory a volume cut into blocks may use to keep the outputs of
            windows straddling block borders for the next blocks, so that each runs once
            (:class:`.blocks.WindowCache`); 0: such windows run once per block they touch.
        resample: resample volumes whose spacing differs from the model's (settings ``spacing``).
        mask_value: the foreground value written (1, or 255 for viewers).
        max_voxels: cap on an input's declared size (None: ``LSMSEG_MAX_VOXELS`` or the default).
        probabilities_dir: :func:`.run.predict_files` also writes probability maps here (same names
            and formats as the masks).
        probability_dtype: ``"uint8"`` (p = value / 255) or ``"float16"``.
        preview: :func:`.run.predict_file` also writes a picture of each mask beside it
            (``<mask name>.preview.png``: the input's z-projection with the mask over it; :mod:`.preview`).
        progress: show progress bars.
    """

    structure: str | None = None
    block_size: int | tuple[int, int, int] | None = None
    skip_background: bool = True
    prefetch: bool | None = None
    device_accumulation: bool = True
    window_cache_mb: int = DEFAULT_WINDOW_CACHE_BYTES >> 20
    resample: bool = True
    mask_value: int = 1
    max_voxels: int | None = None
    probabilities_dir: Path | None = None
    probability_dtype: str = "uint8"
    preview: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.window_cache_mb < 0:
            raise ValueError(f"window_cache_mb must be >= 0, got {self.window_cache_mb}")
        if not 1 <= self.mask_value <= 255:
            raise ValueError(f"mask_value must be in 1..255, got {self.mask_value}")
        if self.probability_dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"probability_dtype must be one of {PROBABILITY_DTYPES}, got {self.probability_dtype!r}")


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


# Seconds between the progress lines of a volume where no bar is drawn (ProgressLines).
PROGRESS_LINE_SECONDS = 60.0


class ProgressLines:
    """A volume's progress as an INFO line at most every :data:`PROGRESS_LINE_SECONDS` where no
    progress bar is drawn (output piped to a file: ``docker logs``, a batch job's log), so that the
    hours a whole organ takes are not silent; a volume done sooner logs nothing.

    Args:
        total: windows in the volume.
        name: the volume's name, at the start of each line.
        every: seconds between lines.
        clock: monotonic seconds (a test's own clock).
    """

    def __init__(self, total: int, name: str, every: float | None = None, clock=time.monotonic):
        self.total, self.name, self.clock = total, name, clock
        self.every = PROGRESS_LINE_SECONDS if every is None else every
        self.done = 0
        self.start = self.last = clock()

    def update(self, n: int) -> None:
        """``n`` more windows done (run, taken from the cache, or skipped as background)."""
        self.done += n
        now = self.clock()
        if now - self.last < self.every or not 0 < self.done < self.total:
            return
        self.last = now
        left = (now - self.start) * (self.total - self.done) / self.done
        logger.info("%s: %d of %d windows (%d %%), about %s left", self.name, self.done, self.total,
                    100 * self.done // self.total, _duration(left))


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Predictor:
    """Applies one Swin UNETR checkpoint to whole volumes.

    Construct it from a model you already have (tests, training validation) or with
    :meth:`from_manifest` (verified weights). :meth:`predict_volume` and :meth:`predict_logits`
    work on arrays; :func:`.run.predict_file` and :func:`.run.predict_files` on paths.

    Args:
        model: the network (logits out).
        model_config: its configuration (the window is its ``roi``).
        settings: how it is applied (overlap, blending, threshold, normalisation, spacing,
            post-processing); default :class:`InferenceSettings`.
        device: torch device; None: CUDA when visible, else CPU.
        precision: ``"auto"`` (fp16/bf16 autocast on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        engine: ``"auto"`` (on CPU OpenVINO, else ONNX Runtime, when installed, else PyTorch), ``"torch"``,
            ``"onnxruntime"``, ``"openvino"``.
        compile: ``torch.compile`` the model.
        weights_info: where the weights came from, for provenance records.
        options: the run's :class:`RunOptions`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        settings: InferenceSettings | None = None,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        engine: str = "auto",
        compile: bool = False,
        weights_info: dict | None = None,
        options: RunOptions | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = select_device(str(device) if device else None)
        self.model = model.to(self.device).eval()
        self.model_config = model_config
        self.settings = settings or InferenceSettings()
        self.precision = precision
        self.compile = compile
        self.weights_info = dict(weights_info or {})
        self.options = options or RunOptions()
        if compile:
            self.model = torch.compile(self.model)
        # OpenVINO or ONNX Runtime on CPU where installed (3-4x PyTorch's speed and more, same logits
        # within float tolerance); see .engines. Both run the network's ONNX export.
        self.engine = resolve_engine(engine, self.device, precision, compile)
        self._onnx = exported_engine(self.engine, self.model, self.weights_info.get("sha256"),
                                     batch_size=self.settings.sw_batch_size)
        self._background_cache: dict[tuple, torch.Tensor] = {}
        # Voxels in the subsample that percentiles and the background level come from.
        self.sample_voxels = DEFAULT_MAX_SAMPLES

    @classmethod
    def from_manifest(
        cls,
        manifest: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        engine: str = "auto",
        compile: bool = False,
        options: RunOptions | None = None,
        **settings,
    ) -> "Predictor":
        """Load verified weights named by a manifest (default: the installed weights).

        Args:
            manifest: a manifest file, a folder holding one, or a model tarball; None: resolved as
                :func:`lsmseg.weights.resolve_manifest` documents.
            device, precision, engine, compile: as for the constructor.
            options: the run's options; ``options.structure`` picks the manifest entry.
            settings: :class:`InferenceSettings` fields that replace the manifest's
                (``threshold=0.4``); None values are ignored. An explicit value wins over every
                structure's ``per_structure`` value.
        """
        from ..weights import load_manifest, load_model, resolve_manifest, tarball_of

        options = options or RunOptions()
        loaded = load_manifest(resolve_manifest(manifest))
        name, entry = loaded.entry_for(options.structure)
        overrides = {k: v for k, v in settings.items() if v is not None}
        chosen = dataclasses.replace(entry.inference, **overrides)
        if overrides and chosen.per_structure:  # an explicit setting wins over every structure's
            chosen.per_structure = {
                structure: {k: v for k, v in values.items() if k not in overrides}
                for structure, values in chosen.per_structure.items()
            }
        target = select_device(str(device) if device else None)
        model = load_model(loaded, entry, target)
        info = {"manifest": str(loaded.path), "model": name, "file": entry.file, "sha256": entry.sha256,
                "structures": list(entry.structures)}
        tarball = tarball_of(loaded.path)
        if tarball is not None:  # the manifest is a scratch copy, removed at exit
            info["tarball"] = str(tarball)
        logger.info("loaded weights '%s' (%s, sha256 %s...) on %s", name, entry.file, entry.sha256[:12], target)
        return cls(model, entry.model, chosen, device=target, precision=precision, engine=engine, compile=compile,
                   weights_info=info, options=options)

    # ------------------------------------------------------------------ the network
    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.model_config.roi)  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> "Predictor":
        """Move the model to ``device`` (e.g. a dask worker's own GPU); returns ``self``."""
        device = torch.device(device)
        if device != self.device:
            self.model = self.model.to(device)
            self.device = device
            self._background_cache.clear()
        return self

    def export_engine(self, compiled: bool = False) -> Path | None:
        """Export the network for ONNX Runtime or OpenVINO now (the file is cached); None when the engine is PyTorch.

        Args:
            compiled: with OpenVINO, also compile the exported network into the cache (where it is
                writable), so that the first run imports it instead of compiling.
        """
        if self._onnx is None:
            return None
        path = self._onnx.export(self.roi)
        if compiled and isinstance(self._onnx, OpenVinoEngine):
            self._onnx.cache_compiled(self.roi)
        return path

    def _autocast(self):
        """Mixed precision where it pays: fp16/bf16 on CUDA by default; on CPU only if asked."""
        kind = self.device.type
        if self.precision == "fp32" or (self.precision == "auto" and kind != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=kind, dtype=autocast_dtype(self.precision))

    def _network(self, windows: torch.Tensor, on_device: bool) -> torch.Tensor:
        """One pass of the network: logits (float32) of channel 0 for a batch of windows."""
        if self._onnx is not None:
            return self._onnx(windows)[:, :1]
        with torch.inference_mode(), self._autocast():
            out = self.model(windows.to(self.device, non_blocking=True))
        out = out[:, :1].float()
        return out if on_device else out.cpu()

    def run_windows(self, windows: torch.Tensor, on_device: bool = False,
                    mirror_axes: Sequence[int] = ()) -> torch.Tensor:
        """Model logits (float32) for a batch of normalised windows (N, 1, *roi).

        Args:
            windows: the batch; on the host (from pinned memory its upload does not block) or on
                the predictor's device.
            on_device: leave the logits on the predictor's device (to blend them there); default:
                on the host. ONNX Runtime's are on the host either way.
            mirror_axes: test-time mirroring: the mean of the logits of the windows as given and
                flipped along every non-empty combination of these spatial axes (0 z, 1 y, 2 x),
                each flipped back (``InferenceSettings.mirror_axes``); () one pass.
        """
        logits = self._network(windows, on_device)
        flips = mirror_flips(mirror_axes)
        for dims in flips:  # out of place: inference tensors refuse in-place updates
            logits = logits + torch.flip(self._network(torch.flip(windows, dims), on_device), dims)
        return logits / (1 + len(flips)) if flips else logits

    def background_logits(self, level: float, window: Sequence[int] | None = None) -> torch.Tensor:
        """What a skipped window contributes: the mean of the model's logits for a uniform window
        (of ``window``, default the ROI) at ``level``, as a uniform tensor of that window's shape.

        The mean, not the answer itself: a network's answer to a constant window can rise above the
        threshold near the window's faces (the shipped real-data model does on ~2 % of it), and a
        field of skipped windows would repeat that pattern as false structure (tests/unit/
        test_foreground.py). Computed once per level. Test-time mirroring would not change it: a
        uniform window is its own mirror image, and flipping an answer back keeps its mean.
        """
        window = tuple(int(w) for w in (window or self.roi))
        key = (round(float(level), 6), window)
        if key not in self._background_cache:
            if len(self._background_cache) >= 8:  # one level per volume: keep the cache small
                self._background_cache.pop(next(iter(self._background_cache)))
            uniform = torch.full((1, 1, *window), key[0], dtype=torch.float32)
            answer = self.run_windows(uniform)[0, 0]
            self._background_cache[key] = torch.full_like(answer, float(answer.mean()))
        return self._background_cache[key]

    # ------------------------------------------------------------------ blocks
    def plan(self, shape: Sequence[int], block_size: int | Sequence[int] | None = None) -> BlockPlan:
        """The block plan and global window grid for a volume of ``shape``.

        Args:
            shape: the volume's shape.
            block_size: output block edge(s); None: one block.
        """
        return plan_blocks(shape, self.roi, self.settings.overlap, block_size)

    def load_block(self, plan: BlockPlan, block: Block, source, lo, hi, background: Background | None,
                   on_raw=None) -> tuple[np.ndarray, list[bool] | None]:
        """Read and normalise a block's input region; decide which of its windows are dark.

        Args:
            plan: the volume's plan.
            block: the block.
            source: the volume's data (numpy or lazy).
            lo, hi: the volume's normalisation range (None: ``source`` is normalised already).
            background: the volume's dark level (None: skip nothing).
            on_raw: sees the raw data first (:meth:`check_finite`).

        Returns:
            The normalised region, and per window whether it is dark (None when nothing is skipped).
        """
        region = plan.read_region(source, block, lo, hi, on_raw=on_raw, upper_tail=self.settings.upper_tail)
        skip = None
        if background is not None:
            origin = [s.start for s in block.region]
            skip = dark_windows(region, origin, plan.window_corners(block), plan.roi, background)
        return region, skip

    def block_logits(self, plan: BlockPlan, block: Block, region: np.ndarray, skip, background: Background | None,
                     on_windows: Callable[[int], object] | None = None,
                     settings: InferenceSettings | None = None, cache: WindowCache | None = None) -> np.ndarray:
        """Blended logits on one block from its normalised input region.

        Args:
            plan, block: the volume's plan and the block.
            region, skip: what :meth:`load_block` returned.
            background: the volume's dark level (a skipped window contributes the model's answer to it).
            on_windows: called with ``n`` after every batch of ``n`` windows the network ran (progress).
            settings: the volume's settings (:meth:`settings_for`: its structure's mirroring);
                default ``self.settings``.
            cache: the volume's window cache (windows found there are not run; see
                :func:`.blocks.accumulate_block`); None: every window of the block runs.
        """
        settings = settings or self.settings
        weights = blend_weights(plan.roi, settings.blend, settings.sigma_scale)
        background_logits = (
            self.background_logits(background.level, plan.roi) if skip is not None and any(skip) else None
        )
        device = self.accumulation_device(block)
        run = functools.partial(self.run_windows, on_device=device is not None, mirror_axes=settings.mirror_axes)
        if on_windows is not None:
            run = _counted(run, on_windows)
        return accumulate_block(plan, block, region, run, weights, settings.sw_batch_size, skip, background_logits,
                                device=device, cache=cache)

    def accumulation_device(self, block: Block) -> torch.device | None:
        """Where ``block`` is blended: the GPU when its free memory holds the block's accumulators
        (the network runs there in PyTorch, ``options.device_accumulation`` on), else None (the host)."""
        if not self.options.device_accumulation or self._onnx is not None:
            return None
        return accumulation_device(self.device, block.shape)

    def iter_block_logits(self, plan: BlockPlan, source, lo, hi, background: Background | None, stats: BlockStats,
                          desc: str | None = None, on_raw=None,
                          settings: InferenceSettings | None = None
                          ) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
        """Yield ``(block, logits, intensity)`` for every block of ``plan``, z-major; reads overlap compute.

        ``intensity`` is the normalised input on the block's output voxels (a view of the region
        read for the network), which :meth:`binary_mask` needs for an intensity floor.

        Args:
            plan, source, lo, hi, background, on_raw: as for :meth:`load_block`.
            stats: counts the windows run and skipped (:meth:`BlockStats.start` of this plan).
            desc: the progress bar's label.
            settings: the volume's settings (as for :meth:`block_logits`).
        """
        # Progress inside the volume: windows (run or skipped as background), with an ETA; where no
        # bar is drawn (a piped log), a line now and then instead.
        total = sum(block.n_windows for block in plan.blocks)
        bar = tqdm(total=total, desc=desc or "volume", unit="window", leave=False,
                   disable=not self.options.progress, dynamic_ncols=True)
        lines = None if self.options.progress else ProgressLines(total, desc or "volume")

        def advance(n: int) -> None:
            bar.update(n)
            if lines is not None:
                lines.update(n)
        prefetch = self.device.type == "cuda" if self.options.prefetch is None else self.options.prefetch
        load = lambda block: self.load_block(plan, block, source, lo, hi, background, on_raw)  # noqa: E731
        cache = WindowCache(plan, self.options.window_cache_mb << 20) if len(plan.blocks) > 1 else None
        try:
            for block, (region, skip) in prefetched(plan.blocks, load, enabled=prefetch):
                reused = cache.reused if cache is not None else 0
                logits = self.block_logits(plan, block, region, skip, background, on_windows=advance,
                                           settings=settings, cache=cache)
                if cache is not None:
                    reused = cache.reused - reused
                advance(reused + (sum(skip) if skip is not None else 0))
                stats.count(plan, block, skip, reused=reused)
                yield block, logits, region[plan.output_in_region(block)]
        finally:
            bar.close()

    # ------------------------------------------------------------------ arrays
    def _background(self, normalised) -> Background | None:
        """The dark background of a normalised volume (from its subsample), or None."""
        return estimate_background(subsample(normalised, self.sample_voxels))

    def _normalised_logits(self, image: np.ndarray, desc: str | None,
                           settings: InferenceSettings | None = None) -> tuple[np.ndarray, BlockStats]:
        image = np.asarray(image, dtype=np.float32)
        background = self._background(image) if self.options.skip_background else None
        plan = self.plan(image.shape, self.options.block_size)
        stats = BlockStats.start(plan, background)
        logits = np.empty(image.shape, dtype=np.float32)
        for block, block_logits, _ in self.iter_block_logits(plan, image, None, None, background, stats, desc=desc,
                                                          settings=settings):
            logits[block.out] = block_logits
        return logits, stats

    def sliding_window_logits(self, image: np.ndarray, desc: str | None = None) -> np.ndarray:
        """Gaussian-blended logits of a normalised float32 volume (any size; padded if small).

        The same block-wise engine as for files, with one block unless ``options.block_size`` is set.
        """
        return self._normalised_logits(image, desc)[0]

    def logits_with_stats(self, image, spacing: Sequence[float] | None = None,
                          name: str = "volume") -> tuple[np.ndarray, BlockStats]:
        """:meth:`predict_logits`, and the window counts of the pass (blocks, windows run and skipped)."""
        return self.logits_from_normalised(self.normalised(image, name), spacing, name)

    def normalised(self, image, name: str = "volume") -> np.ndarray:
        """A raw volume as the network sees it: float32, scaled to its own percentile range.

        Args:
            image: a 3-D array (z, y, x).
            name: labels errors.

        Raises:
            InputError: not 3-D, or NaN/Inf voxels.
        """
        array = np.asarray(image)
        if array.ndim != 3:
            raise InputError(name, f"expected a 3-D volume, got shape {array.shape}")
        refuse_non_finite(array, name)
        lo, hi = percentiles(array, self.settings.lower_percentile, self.settings.upper_percentile, self.sample_voxels)
        return normalise(array, lo, hi, self.settings.upper_tail)

    def logits_from_normalised(self, normalised: np.ndarray, spacing: Sequence[float] | None,
                               name: str) -> tuple[np.ndarray, BlockStats]:
        """:meth:`logits_with_stats` of a volume :meth:`normalised` already (resampled as it says).

        Args:
            normalised: what :meth:`normalised` returned for the volume.
            spacing, name: as for :meth:`predict_logits`.
        """
        settings = self.settings_for(name)  # its structure's mirroring
        shape = normalised.shape
        new_shape = self.network_shape(shape, spacing, name)
        if new_shape is None:
            return self._normalised_logits(normalised, desc=name, settings=settings)
        target = self.resample_target(spacing)
        logger.info("%s: resampling %s%s to %s%s%s", name, tuple(shape), f" at {tuple(spacing)} um" if target else "",
                    tuple(new_shape), f" at {target} um" if target else "",
                    f" (input scale {input_scale_text(settings.input_scale)})" if settings.input_scale != 1.0 else "")
        logits, stats = self._normalised_logits(_resize(normalised, new_shape), desc=name, settings=settings)
        return _resize(logits, shape), stats

    def logits_with_intensity(self, image, spacing: Sequence[float] | None,
                              name: str) -> tuple[np.ndarray, BlockStats, np.ndarray | None]:
        """:meth:`logits_with_stats`, and the normalised input that :meth:`binary_mask` needs when the
        volume's settings set an intensity floor (else None, so that it is not held: peak memory).

        Args:
            image, spacing, name: as for :meth:`predict_logits`.
        """
        normalised = self.normalised(image, name)
        logits, stats = self.logits_from_normalised(normalised, spacing, name)
        return logits, stats, normalised if self.settings_for(name).intensity_floor is not None else None

    def predict_logits(self, image, spacing: Sequence[float] | None = None, name: str = "volume") -> np.ndarray:
        """Blended logits on the input grid for a raw (unnormalised) volume.

        Args:
            image: a 3-D array (z, y, x).
            spacing: its voxel size (z, y, x) in micrometres; resampled to the model's when they
                differ (and ``options.resample``).
            name: labels log lines and errors.
        """
        return self.logits_with_stats(image, spacing, name)[0]

    def predict_volume(self, image, spacing: Sequence[float] | None = None, name: str = "volume") -> np.ndarray:
        """Binary mask (uint8, values {0, 1}) for a raw volume.

        Args:
            image: a 3-D array, or a :class:`~lsmseg.io.Volume` (its spacing and path are used).
            spacing: voxel size (z, y, x) in micrometres.
            name: labels log lines and picks the structure's post-processing (:meth:`settings_for`).
        """
        if isinstance(image, Volume):
            spacing = image.spacing if spacing is None else spacing
            name = str(image.path)
            image = image.load()
        array = np.asarray(image)
        if array.dtype.kind in "buif" and is_constant(array):  # bool too: a blank mask given as input
            warn_constant(name)
            return np.zeros(array.shape, dtype=np.uint8)
        logits, _, intensity = self.logits_with_intensity(array, spacing, name)
        return self.binary_mask(logits, settings=self.settings_for(name), intensity=intensity)

    def settings_for(self, name: str) -> InferenceSettings:
        """The inference settings for the volume ``name``: its structure's post-processing applied.

        Args:
            name: a case or file name; its prefix names the structure unless ``options.structure`` does.
        """
        structure = self.options.structure
        # A named structure may be one of our aliases ("vessels"): the manifest keys the 2026 names.
        named = structure_from_name(structure) or structure if structure else None
        return self.settings.for_structure(named or structure_from_name(str(name)))

    def binary_mask(self, logits: np.ndarray, out=None, volume_shape=None,
                    settings: InferenceSettings | None = None, intensity: np.ndarray | None = None) -> np.ndarray:
        """Thresholded logits, dim voxels dropped, touching objects split, small components removed; values {0, 1}.

        Args:
            logits: blended logits of a volume or a block.
            out, volume_shape: where this block lies in its volume, so that components cut by a
                block border are kept (see :mod:`.postprocess`); None for a whole volume.
            settings: the volume's settings (:meth:`settings_for`); default ``self.settings``.
            intensity: the normalised input on the same voxels (:meth:`normalised`, or a block's
                from :meth:`iter_block_logits`); needed when ``settings.intensity_floor`` is set.
        """
        settings = settings or self.settings
        mask = logits >= logit(settings.threshold)
        if settings.intensity_floor is not None:
            if intensity is None or intensity.shape != logits.shape:
                raise ValueError("intensity_floor needs the normalised intensity of the same voxels (intensity=)")
            mask &= intensity >= settings.intensity_floor
        mask = split_touching(mask.astype(np.uint8), settings.split_touching)
        open_faces = open_faces_of(out, volume_shape) if out is not None else (False,) * 6
        return remove_small_components(mask, settings.min_component_voxels, open_faces)

    def mask_from_logits(self, logits: np.ndarray, out=None, volume_shape=None,
                         settings: InferenceSettings | None = None, intensity: np.ndarray | None = None) -> np.ndarray:
        """:meth:`binary_mask` as written: 0 and ``options.mask_value``."""
        return self._with_mask_value(self.binary_mask(logits, out, volume_shape, settings, intensity))

    def _with_mask_value(self, mask: np.ndarray) -> np.ndarray:
        value = self.options.mask_value
        return mask * np.uint8(value) if value != 1 else mask

    # ------------------------------------------------------------------ volumes
    def network_shape(self, shape: Sequence[int], spacing: Sequence[float] | None,
                      name: str) -> list[int] | None:
        """The grid a volume is predicted on when it is not its own (None): resampled to the model's
        spacing (:meth:`resample_target`), then by its structure's ``input_scale`` (per axis: z, y, x).

        Args:
            shape: the volume's shape (z, y, x).
            spacing: its voxel size in micrometres, or None.
            name: its case or file name (its structure's settings, :meth:`settings_for`).
        """
        target = self.resample_target(spacing)
        scale = self.settings_for(name).input_scale
        if target is None and scale == 1.0:  # three equal factors are held as one (InferenceSettings)
            return None
        new_shape = resampled_shape(shape, spacing, target) if target is not None else list(shape)
        return [max(1, round(n * factor)) for n, factor in zip(new_shape, input_scale_factors(scale))]

    def resample_target(self, spacing: Sequence[float] | None) -> tuple[float, ...] | None:
        """The model's spacing if ``spacing`` differs from it beyond tolerance (and resampling is on), else None."""
        model_spacing = self.settings.spacing
        if not self.options.resample or model_spacing is None or spacing is None:
            return None
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            # 0 or negative would resample to one plane and back; NaN/Inf fail in the shape's rounding.
            raise ValueError(f"spacing {tuple(spacing)} must be positive and finite (micrometres per voxel)")
        ratios = [s / m for s, m in zip(spacing, model_spacing)]
        if all(abs(r - 1.0) <= self.settings.spacing_tolerance for r in ratios):
            return None
        return tuple(model_spacing)

    def prepare(self, volume: Volume, *, block_size: int | Sequence[int] | None = None,
                case_name: str | None = None) -> PreparedVolume:
        """Everything decided once per volume before its blocks run: range, background, blocks, settings.

        Reads only a strided subsample of a lazy volume (twice: percentiles, background).

        Args:
            volume: the (lazily read) volume.
            block_size: output block edge(s); default ``options.block_size``, else
                :func:`.blocks.default_block_shape`.
            case_name: picks the structure's post-processing (default: the volume's file name).
        """
        data = volume.data
        lo, hi = percentiles(data, self.settings.lower_percentile, self.settings.upper_percentile, self.sample_voxels)
        constant = hi <= lo and is_constant(data)
        background = None
        if self.options.skip_background and not constant:
            background = estimate_background(normalise(subsample(data, self.sample_voxels), lo, hi,
                                                        self.settings.upper_tail))
        size = block_size or self.options.block_size or default_block_shape(
            volume.shape, stride=grid_stride(self.roi, self.settings.overlap))
        plan = self.plan(volume.shape, size)
        return PreparedVolume(volume, lo, hi, background, plan, constant, self.settings_for(case_name or volume.name))

    def check_finite(self, path) -> Callable[[np.ndarray], None]:
        """A check for raw block data (:func:`refuse_non_finite`), for :meth:`load_block`'s ``on_raw``."""
        return functools.partial(refuse_non_finite, name=path, where=" in one block")

    def iter_mask_blocks(self, prepared: PreparedVolume, stats: BlockStats, desc: str | None = None,
                         on_logits=None) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Yield ``(slices, mask block)`` for a prepared volume, z-major, with the mask value.

        Args:
            prepared: what :meth:`prepare` returned.
            stats: counts the windows (:meth:`BlockStats.start` of ``prepared.plan``).
            desc: the progress bar's label.
            on_logits: sees each block's ``(slices, logits)`` first (probability maps).
        """
        volume, plan = prepared.volume, prepared.plan
        if prepared.constant:
            warn_constant(volume.path)
            for block in plan.blocks:
                if on_logits is not None:
                    on_logits(block.out, np.full(block.shape, -np.inf, dtype=np.float32))
                yield block.out, np.zeros(block.shape, dtype=np.uint8)
            return
        for block, logits, intensity in self.iter_block_logits(
            plan, volume.data, prepared.lo, prepared.hi, prepared.background, stats, desc=desc,
            on_raw=self.check_finite(volume.path), settings=prepared.settings,
        ):
            if on_logits is not None:
                on_logits(block.out, logits)
            yield block.out, self.mask_from_logits(logits, block.out, volume.shape, prepared.settings, intensity)

    def parameters(self) -> dict:
        """The settings that decided a mask, for its provenance record."""
        return {
            "model_config": to_dict(self.model_config),
            "inference": to_dict(self.settings),
            "device": str(self.device),
            "precision": self.precision,
            "engine": self.engine,
            # ONNX files used per window shape: "exported": false is a cache hit (.engines).
            "onnx_models": self._onnx.describe() if self._onnx is not None else None,
            "resample": self.options.resample,
            "mask_value": self.options.mask_value,
            "structure": self.options.structure,
        }


# ---------------------------------------------------------------------- helpers


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The shape of a volume of ``shape`` at ``spacing`` resampled to ``target`` spacing (each axis at least 1)."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]


def refuse_non_finite(array: np.ndarray, name, where: str = "") -> None:
    """Raise :class:`InputError` for ``name`` when a float ``array`` holds NaN/Inf voxels: bad input,
    whose values are never guessed. ``where`` qualifies the count (a block's, not the volume's)."""
    if array.dtype.kind == "f":
        finite = int(np.count_nonzero(np.isfinite(array)))  # the check and the count in one pass
        if finite < array.size:
            raise InputError(name, non_finite_reason(array.size - finite, where))


def non_finite_reason(count: int, where: str = "") -> str:
    """The one message for ``count`` NaN/Inf voxels (inference's blocks, training's scans)."""
    return f"volume contains {count} NaN/Inf voxel(s){where}; refusing to guess their values"


def warn_constant(name) -> None:
    """The one warning for a volume of one intensity throughout (every front end writes it an empty mask)."""
    logger.warning("%s: constant intensity, nothing to segment; writing an empty mask", printable(name))


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The tensor dims (N, C, z, y, x) of every non-empty combination of the spatial ``mirror_axes``."""
    dims = [int(a) + 2 for a in mirror_axes]
    return [flip for k in range(1, len(dims) + 1) for flip in itertools.combinations(dims, k)]


def _counted(run_windows: Callable, on_windows: Callable[[int], object]) -> Callable:
    """``run_windows`` that reports how many windows each call ran."""

    def run(windows: torch.Tensor) -> torch.Tensor:
        out = run_windows(windows)
        on_windows(len(windows))
        return out

    return run


def _resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a float volume (used for spacing changes, both ways)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()
