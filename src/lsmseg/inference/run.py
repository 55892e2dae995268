"""The run API for files: a predictor applied to volumes on disk, returning typed results.

    from lsmseg.inference import Predictor, predict_files
    results = predict_files(Predictor.from_manifest(), [Path("in/brain01.tif")], Path("out"))
    failed = [r for r in results if not r.ok]          # each with its one-line r.error

Every front end (CLI, challenge modes, dask) writes masks through :func:`predict_file`: the input is
read lazily, the mask written block by block as it is predicted, atomically, with a provenance JSON
beside it (:func:`.results.provenance_record`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..config import plain
from ..errors import InputError, LsmsegError, OutputError, ProvenanceError, one_line, printable, single_line
from ..io import (
    Volume, check_declared_size, check_output_space, colliding_outputs, link_out_inside, output_key, output_path_for, outside_folder,
    read_volume, refuse_overwriting_inputs, same_file, sweep_partials, write_json, write_mask_blocks,
)
from ..normalise import is_constant
from ..resources import available_memory
from ..structures import structure_from_name
from .predictor import Predictor, warn_constant
from .preview import PreviewRecorder, preview_path_for, remove_stale_preview
from .probabilities import ProbabilityWriter
from .results import BlockStats, VolumeResult, provenance_path_for, provenance_record

logger = logging.getLogger(__name__)

def write_provenance(predictor: Predictor, input_path, output_path, volume: Volume, provenance_path=None,
                     **record) -> dict:
    """Build a mask's provenance record and write it beside the mask (or to ``provenance_path``).

    Args:
        predictor: what predicted the mask (its parameters and weights are recorded).
        input_path, output_path, volume: the input and the mask.
        provenance_path: where the JSON goes (default: :func:`.results.provenance_path_for`).
        record: the rest of :func:`.results.provenance_record`'s arguments (stats, foreground,
            timings, resampled_to, postprocess, probabilities).

    Raises:
        ProvenanceError: the record could not be written (its ``record`` is the built one).
    """
    built = provenance_record(input_path, output_path, volume, parameters=predictor.parameters(),
                              weights=predictor.weights_info, **record)
    target = Path(provenance_path) if provenance_path else provenance_path_for(output_path)
    try:
        write_json(built, target)
    except LsmsegError as exc:  # the mask is on disk: say so, apart from "no mask written"
        # An earlier run's record would describe the new mask wrongly (its threshold, its weights).
        with contextlib.suppress(OSError):
            if target.is_file() or target.is_symlink():
                target.unlink()
        raise ProvenanceError(exc, output_path, built) from exc
    return built


def postprocess_record(predictor: Predictor, name: str) -> dict:
    """The post-processing that decided the mask of the case ``name``, as its provenance records it."""
    effective = predictor.settings_for(name)
    return {"structure": predictor.options.structure or structure_from_name(name),
            "threshold": effective.threshold, "split_touching": effective.split_touching,
            "min_component_voxels": effective.min_component_voxels,
            "mirror_axes": list(effective.mirror_axes), "intensity_floor": effective.intensity_floor,
            "input_scale": plain(effective.input_scale)}  # three factors: a list, as mirror_axes


def predict_file(
    predictor: Predictor, input_path: str | Path, output_path: str | Path, *,
    provenance_path: str | Path | None = None, case_name: str | None = None,
    probabilities_path: str | Path | None = None,
) -> VolumeResult:
    """Segment one file block by block; write the mask atomically and a provenance JSON beside it.

    The input is read lazily and the mask written as blocks complete, so memory depends on the
    block size, not on the volume. Volumes that must be resampled to the model's spacing, or by
    their structure's ``input_scale``, are the exception: they are resampled (and predicted) in memory.

    Args:
        predictor: the model, its settings and the run's options.
        input_path: the volume.
        output_path: the mask (its suffix picks the format).
        provenance_path: the provenance JSON (default: beside the mask).
        case_name: the name whose structure picks the post-processing (default: the file's name),
            e.g. the challenge's ``image.name``.
        probabilities_path: also write the foreground probability there, block by block, in the
            same format (``options.probability_dtype``).

    Raises:
        LsmsegError: no mask was written (bad input, unwritable output, ...).
        ProvenanceError: the mask was written but its provenance JSON was not.
    """
    options = predictor.options
    input_path, output_path = Path(input_path), Path(output_path)
    timings = {}
    start = time.perf_counter()
    volume = read_volume(input_path, lazy=True, max_voxels=options.max_voxels)
    check_output_space(output_path, volume.shape)
    target = predictor.resample_target(volume.spacing)
    # Resampling (to the model's spacing, or by the structure's input_scale) builds the volume on the
    # network's grid, in memory.
    case = case_name or volume.name
    grid = predictor.network_shape(volume.shape, volume.spacing, case)
    if grid is not None:
        way_out = _own_grid_way_out(predictor, case, target)
        check_declared_size(input_path, grid, 4, options.max_voxels, what="resampled volume", way_out=way_out)
        need, free = resampled_peak_bytes(shape=volume.shape, grid=grid, itemsize=volume.dtype.itemsize), available_memory()
        if free is not None and need > free:
            raise InputError(input_path, f"resampling to {' x '.join(map(str, grid))} needs the whole volume in memory, "
                                         f"about {need / 2**30:.1f} GB, but {free / 2**30:.1f} GB is available; {way_out}")
    probabilities = None
    if probabilities_path is not None:
        probabilities = ProbabilityWriter(Path(probabilities_path), volume, options.probability_dtype)
    on_logits = probabilities.put if probabilities is not None else None
    preview = PreviewRecorder(volume, preview_path_for(output_path)) if options.preview else None
    counter = _BlockCounter()
    if grid is None:
        prepared = predictor.prepare(volume, case_name=case_name)
        stats = BlockStats.start(prepared.plan, prepared.background)
        blocks = predictor.iter_mask_blocks(prepared, stats, desc=volume.name, on_logits=on_logits)
    else:
        logger.info("%s: resampling needs the whole volume in memory", printable(input_path))
        name = case_name or str(volume.path)
        stats, blocks = counter.call(_resampled_mask_blocks, predictor, volume, name, on_logits)
    predicted_before_writing = counter.seconds
    timings["read_s"] = time.perf_counter() - start - predicted_before_writing
    start = time.perf_counter()
    def then_probabilities(blocks):
        for index, block in blocks:
            if preview is not None:
                preview.put(index, block)
            yield index, block
        if probabilities is not None:  # complete before the mask is renamed into place: a failed
            probabilities.finish()     # map fails the volume with no mask left behind

    try:
        write_mask_blocks(counter.timed(then_probabilities(blocks)), output_path, volume.shape, like=volume)
    except BaseException:
        if probabilities is not None:
            probabilities.abort()
        raise
    if probabilities is not None and not probabilities.finished:  # a writer that stopped pulling early
        probabilities.finish()
    timings["predict_s"] = counter.seconds
    # Blocks are computed while the writer pulls them: that time is prediction, not writing.
    timings["write_s"] = max(time.perf_counter() - start - (counter.seconds - predicted_before_writing), 0.0)
    # After the mask is in place: a run that fails leaves no picture of a mask that is not there.
    preview_written = preview.finish() if preview is not None else None
    if preview_written is None:
        remove_stale_preview(output_path)
    record = write_provenance(
        predictor, input_path, output_path, volume, provenance_path, stats=stats, resampled_to=target,
        foreground=counter.foreground, timings=timings, postprocess=postprocess_record(predictor, case),
        probabilities=probabilities.describe() if probabilities is not None else None, preview=preview_written,
    )
    reused = f"; {stats.windows_reused} taken from the window cache" if stats.windows_reused else ""
    logger.info("%s -> %s (%.1f s; %d of %d windows skipped as background%s)", printable(input_path),
                printable(output_path), sum(timings.values()), stats.windows_skipped, stats.windows, reused)
    return VolumeResult.written(record)


def check_targets(inputs, outputs, probabilities=None, input_folders=()) -> dict[int, LsmsegError]:
    """Check where a run would write, before any work; return the volumes that must not be processed.

    Args:
        inputs: the volumes.
        outputs: each volume's mask.
        probabilities: each volume's probability map (None: none written).
        input_folders: the folders the inputs were listed from (files among them are ignored).

    Returns:
        ``{index: error}``: volumes listed from an input folder that lead out of it (a link to
        elsewhere: nothing outside the input is read), and volumes whose mask or probability map
        would be another's (or whose mask and map would be one file; names compared case-folded,
        as case-insensitive file systems do): none of them is written, rather than one silently
        replacing the other. Volumes sharing a path share one error. Each error is logged once.

    Raises:
        OutputError: the whole run is refused: a mask or probability map would replace (or sit
            inside) an input or an input folder, or the probability maps would go into the masks'
            own folder (a usage error: every map would replace its mask).
    """
    inputs, outputs = [Path(p) for p in inputs], [Path(o) for o in outputs]
    probabilities = [Path(p) if p is not None else None for p in (probabilities or [None] * len(inputs))]
    targets = [(i, o) for i, o in enumerate(outputs)] + [(i, p) for i, p in enumerate(probabilities) if p is not None]
    # Entries leading out of their input folder are refused first, alone: a link to a folder that
    # holds the output (in/up -> ..) must not pass for an input the output would land in.
    refused: dict[int, LsmsegError] = {}
    folders = [Path(f) for f in input_folders if Path(f).is_dir()]
    for index, input_path in enumerate(inputs):
        folder = next((f for f in folders if same_file(input_path.parent, f)), None)
        target = outside_folder(input_path, folder) if folder is not None else None
        if target is not None:
            where = ("back to the input folder itself" if same_file(target, folder)
                     else f"outside the input folder {printable(folder)}")
            refused[index] = InputError(input_path, f"links to {printable(target)}, {where}; refusing to read it")
        elif folder is not None and input_path.is_dir():  # a plane folder or zarr store: links inside it too
            try:
                found = link_out_inside(input_path, folder)
            except OSError as exc:
                refused[index] = InputError(input_path, f"cannot list the folder ({exc.strerror or exc})")
                continue
            if found is not None:
                link, target = found
                refused[index] = InputError(input_path, f"holds {printable(link.relative_to(input_path))}, a link to "
                                                        f"{printable(target)}, outside the input folder "
                                                        f"{printable(folder)}; refusing to read it")
    targets = [(i, target) for i, target in targets if i not in refused]
    refuse_overwriting_inputs([(inputs[i], target) for i, target in targets], input_folders)
    for probability, output in zip(probabilities, outputs):
        if probability is not None and output_key(probability.parent) == output_key(output.parent):
            raise OutputError(probability.parent, "probability maps would go into the masks' folder and replace the "
                                                  "masks (same names); choose another folder for them")
    for output, owners in colliding_outputs(targets).items():
        owners = list(dict.fromkeys(owners))
        if len(owners) == 1:
            reason = f"would be both the mask and the probability map of {printable(inputs[owners[0]])}"
        else:
            names = ", ".join(printable(inputs[i]) for i in owners)
            reason = (f"would be written for each of {names}; none of them is segmented (give them distinct "
                      "names or predict them into separate folders)")
        error = OutputError(output, reason)
        for index in owners:
            refused.setdefault(index, error)
    for error in dict.fromkeys(refused.values()):  # one line per problem, even when it names two volumes
        logger.error("%s", error)
    return refused


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    output_paths: Sequence[str | Path] | None = None,
    output_format: str = "same",
    input_folders: Sequence[str | Path] = (),
) -> list[VolumeResult]:
    """Segment many files; a failure is one logged line and never stops the others.

    Every target is checked before any work (:func:`check_targets`): the run is refused when it would
    write over or into an input; volumes that lead out of their input folder or share an output
    with another volume fail, each with one logged line.

    Args:
        predictor: the model, its settings and the run's options (``options.probabilities_dir``:
            probability maps beside the masks).
        inputs: the volumes.
        out_dir: the output folder.
        output_paths: each input's mask (default: :func:`lsmseg.io.output_path_for` in ``out_dir``).
        output_format: ``"same"`` (the input's container) or ``"zarr"`` (OME-Zarr).
        input_folders: the folders the inputs were listed from (the command line's folder
            arguments, folder mode's input folder; files among them are ignored): no output may lie
            inside one, and a volume listed from one must not lead out of it.
    """
    options = predictor.options
    out_dir = Path(out_dir)
    outputs = ([Path(o) for o in output_paths] if output_paths
               else [output_path_for(p, out_dir, output_format) for p in inputs])
    probability_dir = Path(options.probabilities_dir) if options.probabilities_dir else None
    probabilities = [probability_dir / o.name if probability_dir else None for o in outputs]
    refused = check_targets(inputs, outputs, probabilities, input_folders)  # before any work
    for folder in {o.parent for o in outputs} | {p.parent for p in probabilities if p is not None}:
        sweep_partials(folder)
    results = []
    for index, (input_path, output, probability) in enumerate(tqdm(
        list(zip(inputs, outputs, probabilities)), desc="volumes", unit="vol",
        disable=not options.progress or len(inputs) < 2,
    )):
        if index in refused:
            results.append(VolumeResult.failed(input_path, output, str(refused[index])))
            continue
        results.append(guarded(
            lambda: predict_file(predictor, input_path, output, probabilities_path=probability), input_path, output,
        ))
    return results


def guarded(predict: Callable[[], VolumeResult], input_path, output_path) -> VolumeResult:
    """``predict()``, with any failure turned into a :class:`VolumeResult` and one logged line.

    Args:
        predict: predicts one volume.
        input_path, output_path: the volume and its mask, for the failure's result.
    """
    try:
        return predict()
    except ProvenanceError as exc:
        logger.error("%s", exc)
        return VolumeResult.written(exc.record, provenance_error=str(exc))
    except LsmsegError as exc:
        logger.error("%s", exc)
        return VolumeResult.failed(input_path, output_path, str(exc))
    except MemoryError:
        message = one_line(input_path, "out of memory while predicting")
    except Exception as exc:  # a bug, an unforeseen file or a dead dask worker: report it, keep going
        message = one_line(input_path, f"unexpected {type(exc).__name__}: {single_line(exc)[:300]}")
        logger.debug("traceback", exc_info=True)
    logger.error("%s", message)
    return VolumeResult.failed(input_path, output_path, message)


# Bytes per voxel of the network's grid that the in-memory path holds at its peak: the resampled
# input, the logits, the padded region and the two blending accumulators (float32 each; the
# input-grid logits and mask come later, at a lower peak). Measured: peak RSS minus the RSS before one
# predict_file (tiny test model, 1 thread, uint16, input_scale 1.5): 381 MiB on 32x64x64 (the
# network's own working memory, ~370 MiB, not per voxel and not counted here), 951 MiB on
# 128x256x256 (grid 192x384x384): 580 MiB beyond it = 20 B per grid voxel plus 6 per input voxel.
# Mid sizes, where that working memory overlaps less, rose ~29 B per grid voxel (64x128x128 to
# 96x192x192; a spacing resample, 128^3 to 64x256x256, alike).
RESAMPLED_BYTES_PER_GRID_VOXEL = 20
# Beside them, on the input grid and throughout: the raw input (its itemsize) and its float32 copy.
RESAMPLED_BYTES_PER_INPUT_VOXEL = 4


def resampled_peak_bytes(*, shape, grid, itemsize: int) -> int:
    """About the most memory :func:`predict_file` takes for a volume it resamples (in memory),
    beyond the network's own working memory: a 500x1000x1000 uint16 c-Fos volume at input_scale 1.5
    needs ~34 GB.

    Args:
        shape: the volume's shape (z, y, x).
        grid: the shape it is predicted on (:meth:`Predictor.network_shape`).
        itemsize: bytes per voxel of the volume as read (2 for uint16).
    """
    voxels, grid_voxels = math.prod(int(n) for n in shape), math.prod(int(n) for n in grid)
    return voxels * (itemsize + RESAMPLED_BYTES_PER_INPUT_VOXEL) + grid_voxels * RESAMPLED_BYTES_PER_GRID_VOXEL


def _own_grid_way_out(predictor: Predictor, name: str, target) -> str:
    """How to predict a volume that would be resampled on its own grid, block by block, instead."""
    options = []
    if predictor.settings_for(name).input_scale != 1.0:
        options.append("--input-scale 1")
    if target is not None:
        options.append("--no-resample")
    return f"{' '.join(options)} predicts it on its own grid, block by block"


def _resampled_mask_blocks(predictor: Predictor, volume: Volume, name: str, on_logits=None):
    """The whole volume as one block, predicted in memory at the model's spacing: ``(stats, blocks)``."""
    array = volume.load()
    everything = tuple(slice(0, s) for s in volume.shape)
    if array.dtype.kind in "buif" and is_constant(array):
        warn_constant(name)
        if on_logits is not None:
            on_logits(everything, np.full(array.shape, -np.inf, dtype=np.float32))
        return BlockStats.start(predictor.plan(array.shape), None), [(everything, np.zeros(array.shape, np.uint8))]
    logits, stats, intensity = predictor.logits_with_intensity(array, volume.spacing, name)
    del array  # post-processing need not hold it (peak memory)
    if on_logits is not None:
        on_logits(everything, logits)
    settings = predictor.settings_for(name)
    return stats, [(everything, predictor.mask_from_logits(logits, settings=settings, intensity=intensity))]


class _BlockCounter:
    """Time spent producing mask blocks, and their foreground voxels."""

    def __init__(self):
        self.foreground, self.seconds = 0, 0.0

    def call(self, function, *args):
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def timed(self, blocks):
        iterator = iter(blocks)
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
