"""The predictor: volume in, binary mask out. Every front end (CLI, container, HTTP) calls this.

    predictor = Predictor.from_manifest()                 # verified weights from weights/manifest.yaml
    predictor.predict_files([Path("in/brain01.tif")], Path("out"))

Pipeline: read (lsmseg.io) -> percentile normalisation (lsmseg.normalise) -> optional resampling to
the model's voxel spacing -> Gaussian-blended sliding window (lsmseg.windows) -> sigmoid ->
threshold -> write the mask in the input's container format, plus a provenance JSON beside it.
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
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import InferenceSettings, ModelConfig, to_dict
from .errors import InputError, LsmsegError, OutputError
from .io import Volume, atomic_output, output_path_for, read_volume, volume_name, write_mask
from .model import select_device
from .normalise import normalise, percentiles
from .weights import Manifest, find_manifest, load_manifest, load_model
from .windows import batched, blend_weights, crop_padding, pad_widths, window_starts

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
        return cls(model, entry.model, settings, device=target, weights_info=info, **other)

    # ------------------------------------------------------------------ numerics
    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.model_config.roi)  # type: ignore[return-value]

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
        with torch.inference_mode(), self._autocast():
            out = self.model(windows.to(self.device, non_blocking=True))
        return out[:, :1].float()

    def sliding_window_logits(self, image: np.ndarray, desc: str | None = None) -> np.ndarray:
        """Gaussian-blended logits of a normalised float32 volume (any size; padded if small)."""
        roi, settings = self.roi, self.settings
        widths = pad_widths(image.shape, roi)
        padded = np.pad(image, widths) if any(sum(w) for w in widths) else image
        starts = window_starts(padded.shape, roi, settings.overlap)
        weights = blend_weights(roi, settings.blend, settings.sigma_scale)
        weights_np = weights.numpy()
        accumulated = np.zeros(padded.shape, dtype=np.float32)
        weight_sum = np.zeros(padded.shape, dtype=np.float32)
        source = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
        bar = tqdm(
            total=len(starts), desc=desc or "windows", unit="win", leave=False, disable=not self.progress
        )
        for batch in batched(starts, settings.sw_batch_size):
            slices = [tuple(slice(s, s + r) for s, r in zip(corner, roi)) for corner in batch]
            windows = torch.stack([source[index] for index in slices])[:, None]
            logits = (self.run_windows(windows)[:, 0].cpu() * weights).numpy()
            for index, window_logits in zip(slices, logits):
                accumulated[index] += window_logits
                weight_sum[index] += weights_np
            bar.update(len(batch))
        bar.close()
        accumulated /= weight_sum
        return crop_padding(accumulated, widths)

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
        lo, hi = percentiles(array, self.settings.lower_percentile, self.settings.upper_percentile)
        normalised = normalise(array, lo, hi)
        target = self._target_spacing(spacing)
        if target is None:
            return self.sliding_window_logits(normalised, desc=name)
        new_shape = [max(1, round(n * s / t)) for n, s, t in zip(array.shape, spacing, target)]
        logger.info("%s: resampling %s at %s um to %s at %s um", name, array.shape, tuple(spacing), tuple(new_shape), target)
        resampled = _resize(normalised, new_shape)
        logits = self.sliding_window_logits(resampled, desc=name)
        return _resize(logits, array.shape)

    def predict_volume(self, image, spacing: Sequence[float] | None = None, name: str = "volume") -> np.ndarray:
        """Binary mask (uint8, values {0, 1}) for a raw volume; ``spacing`` in (z, y, x) um."""
        if isinstance(image, Volume):
            spacing = image.spacing if spacing is None else spacing
            name = str(image.path)
            image = image.load()
        array = np.asarray(image)
        if array.size and array.dtype.kind in "uif" and _is_constant(array):
            logger.warning("%s: constant intensity, nothing to segment; writing an empty mask", name)
            return np.zeros(array.shape, dtype=np.uint8)
        logits = self.predict_logits(array, spacing, name)
        return (logits >= logit(self.settings.threshold)).astype(np.uint8)

    # ------------------------------------------------------------------ files
    def parameters(self) -> dict:
        return {
            "model_config": to_dict(self.model_config),
            "inference": to_dict(self.settings),
            "device": str(self.device),
            "precision": self.precision,
            "resample": self.resample,
            "mask_value": self.mask_value,
        }

    def predict_file(
        self, input_path: str | Path, output_path: str | Path, provenance_path: str | Path | None = None
    ) -> dict:
        """Segment one file; write the mask atomically and a provenance JSON beside it."""
        input_path, output_path = Path(input_path), Path(output_path)
        timings = {}
        start = time.perf_counter()
        volume = read_volume(input_path)
        timings["read_s"] = time.perf_counter() - start
        start = time.perf_counter()
        target = self._target_spacing(volume.spacing)
        mask = self.predict_volume(volume.load(), volume.spacing, name=str(input_path))
        timings["predict_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.mask_value != 1:
            mask = mask * np.uint8(self.mask_value)
        write_mask(mask, output_path, like=volume)
        timings["write_s"] = time.perf_counter() - start
        record = {
            "input": str(input_path),
            "output": str(output_path),
            "ok": True,
            "error": None,
            "shape": list(volume.shape),
            "dtype": str(volume.dtype),
            "spacing_um": list(volume.spacing) if volume.spacing else None,
            "resampled_to_um": list(target) if target else None,
            "foreground_fraction": float(np.count_nonzero(mask)) / max(mask.size, 1),
            "parameters": self.parameters(),
            "weights": self.weights_info,
            "versions": versions(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        provenance_path = Path(provenance_path) if provenance_path else provenance_path_for(output_path)
        write_json(record, provenance_path)
        logger.info("%s -> %s (%.1f s)", input_path, output_path, sum(timings.values()))
        return record

    def predict_files(
        self, inputs: Sequence[str | Path], out_dir: str | Path, output_paths: Sequence[str | Path] | None = None
    ) -> list[dict]:
        """Segment many files; a failure is one logged line and never stops the others."""
        out_dir = Path(out_dir)
        outputs = list(output_paths) if output_paths else [output_path_for(p, out_dir) for p in inputs]
        results = []
        for input_path, output_path in tqdm(
            list(zip(inputs, outputs)), desc="volumes", unit="vol", disable=not self.progress or len(inputs) < 2
        ):
            try:
                results.append(self.predict_file(input_path, output_path))
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
    output_path = Path(output_path)
    return output_path.parent / f"{volume_name(output_path)}.provenance.json"


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
