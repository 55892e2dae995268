"""Blocks of one volume spread over dask.distributed workers, written into zarr regions.

The driver does what is decided once per volume (percentiles, background level, the block plan;
:meth:`Predictor.prepare`) and submits one task per block. A worker opens the input lazily, runs
the same block code as the single-process path (:meth:`Predictor.load_block`,
:meth:`Predictor.block_logits`), and writes its mask block into a zarr array whose chunks are the
blocks, so no two workers ever write the same chunk. The mask is therefore identical to the
single-process one. A TIFF or plane-folder output is then streamed from the zarr, slab by slab.

    lsmseg predict in/ -o out/ --scheduler dask                        # LocalCluster on this machine
    lsmseg predict in/ -o out/ --scheduler dask --address tcp://host:8786   # an existing cluster
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .errors import LsmsegError, OutputError
from .io import (
    PARTIAL_PREFIX, _remove, atomic_output, check_output_space, create_zarr_mask, mask_format_for, read_volume,
    refuse_overwriting_inputs, sweep_partials, write_mask_blocks,
)

logger = logging.getLogger(__name__)


def _worker_index() -> int:
    try:
        from distributed import get_worker

        name = get_worker().name
        return int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        return 0


def _place_on_worker_device(predictor) -> None:
    """One GPU per worker: worker i uses cuda:(i mod #GPUs) (its own copy of the predictor)."""
    import torch

    if predictor.device.type != "cuda" or not torch.cuda.is_available():
        return
    target = torch.device("cuda", _worker_index() % torch.cuda.device_count())
    if predictor.device != target:
        predictor.model = predictor.model.to(target)
        predictor.device = target
        predictor._background_cache.clear()


def run_block(predictor, input_path: str, prepared_state: dict, block_index: int, zarr_path: str) -> dict:
    """Worker task: predict one block and write it into the zarr; return counts for provenance."""
    import zarr

    _place_on_worker_device(predictor)
    plan, background = prepared_state["plan"], prepared_state["background"]
    block = plan.blocks[block_index]
    volume = read_volume(input_path, lazy=True)
    region, skip = predictor.load_block(
        plan, block, volume.data, prepared_state["lo"], prepared_state["hi"], background,
        on_raw=predictor.check_finite(volume.path),
    )
    mask = predictor.mask_from_logits(predictor.block_logits(plan, block, region, skip, background), block.out,
                                      volume.shape, predictor.settings_for(volume.name))
    zarr.open_array(str(Path(zarr_path) / "0"), mode="r+")[block.out] = mask
    skipped = [i for i, s in zip(plan.window_ids(block), skip) if s] if skip is not None else []
    return {
        "index": block_index,
        "foreground": int(np.count_nonzero(mask)),
        "runs": block.n_windows - len(skipped),
        "skipped": skipped,
    }


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None, processes: bool = True):
    """A client for ``address``, or a LocalCluster with one worker per GPU (one on a CPU-only host)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise LsmsegError("--scheduler dask needs the 'distributed' package: pip install 'lsmseg[distributed]'") from exc
    _quiet_dask_logs()
    if address:
        try:
            client = Client(address, timeout="30s")
        except OSError as exc:
            raise LsmsegError(f"{address}: cannot reach the dask scheduler ({exc})") from exc
        with client:
            yield client
        return
    import torch

    if n_workers is None:
        n_workers = max(1, torch.cuda.device_count())
    quiet = logging.DEBUG if logging.getLogger().level <= logging.DEBUG else logging.WARNING
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=processes, dashboard_address=":0", silence_logs=quiet
    ) as cluster, Client(cluster) as client:
        yield client


def _quiet_dask_logs() -> None:
    """dask.distributed logs every worker start and stop at INFO; keep them for --verbose only."""
    if logging.getLogger().level <= logging.DEBUG:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("distributed", "bokeh", "tornado")):
            logging.getLogger(name).setLevel(logging.WARNING)


def predict_file_dask(predictor, input_path, output_path, client, provenance_path=None) -> dict:
    """Segment one file with its blocks spread over ``client``'s workers."""
    input_path, output_path = Path(input_path), Path(output_path)
    start = time.perf_counter()
    volume = read_volume(input_path, lazy=True, max_voxels=getattr(predictor, "max_voxels", None))
    check_output_space(output_path, volume.shape)
    if predictor._target_spacing(volume.spacing) is not None:
        logger.info("%s: needs resampling, predicted in this process", input_path)
        return predictor.predict_file(input_path, output_path, provenance_path)
    prepared = predictor.prepare(volume)
    plan = prepared.plan
    read_s = time.perf_counter() - start
    state = {"plan": plan, "lo": prepared.lo, "hi": prepared.hi, "background": prepared.background}
    as_zarr = mask_format_for(output_path, volume) == "zarr"
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if as_zarr:
            store = stack.enter_context(atomic_output(output_path))
        else:  # a scratch zarr beside the output, streamed into the output's format at the end
            store = output_path.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{output_path.name}.zarr"
            stack.callback(_remove, store)
        try:
            output_path.parent.mkdir(parents=True, exist_ok=True)
            create_zarr_mask(store, volume.shape, np.uint8, plan.block_size, volume.spacing, like=volume)
        except OSError as exc:
            raise OutputError(output_path, f"cannot write output: {exc.strerror or exc}") from exc
        if prepared.constant:
            logger.warning("%s: constant intensity, nothing to segment; writing an empty mask", input_path)
            results = []
        else:
            results = _run_blocks(predictor, client, str(input_path), state, str(store), len(plan.blocks), volume.name)
        if not as_zarr:
            import zarr

            array = zarr.open_array(str(Path(store) / "0"), mode="r")
            blocks = ((block.out, np.asarray(array[block.out])) for block in plan.blocks)
            write_mask_blocks(blocks, output_path, volume.shape, like=volume)
    predict_s = time.perf_counter() - start
    skipped = set()
    for result in results:
        skipped.update(result["skipped"])
    stats = {
        "blocks": len(plan.blocks),
        "block_size": list(plan.block_size),
        "windows": plan.n_windows,
        "window_runs": sum(r["runs"] for r in results),
        "windows_skipped": len(skipped),
        "background": prepared.background.as_dict() if prepared.background is not None else None,
        "scheduler": "dask",
        "workers": len(client.scheduler_info().get("workers", {})),
    }
    predictor.last_stats = stats
    record = predictor.write_provenance(
        input_path, output_path, volume, provenance_path,
        foreground=sum(r["foreground"] for r in results), timings={"read_s": read_s, "predict_s": predict_s},
    )
    logger.info("%s -> %s (%.1f s on %d dask worker(s); %d of %d windows skipped as background)",
                input_path, output_path, read_s + predict_s, stats["workers"], stats["windows_skipped"], stats["windows"])
    return record


def _run_blocks(predictor, client, input_path: str, state: dict, store: str, n_blocks: int, name: str) -> list[dict]:
    from distributed import as_completed

    shared = client.scatter(predictor, broadcast=True)
    futures = [
        client.submit(run_block, shared, input_path, state, index, store, pure=False, key=f"lsmseg-block-{uuid.uuid4().hex}")
        for index in range(n_blocks)
    ]
    results = []
    bar = tqdm(total=n_blocks, desc=name, unit="block", leave=False, disable=not predictor.progress)
    try:
        for future in as_completed(futures):
            results.append(future.result())  # re-raises the worker's exception (InputError, ...)
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return results


def predict_files_dask(
    predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    output_format: str = "same",
    address: str | None = None,
    n_workers: int | None = None,
    processes: bool = True,
) -> list[dict]:
    """Like :meth:`Predictor.predict_files`, with each volume's blocks spread over dask workers."""
    from .predictor import _failure

    outputs = [predictor.output_path(p, out_dir, output_format) for p in inputs]
    refuse_overwriting_inputs(zip(inputs, outputs))  # before any work: never replace an input
    for folder in {Path(o).parent for o in outputs}:
        sweep_partials(folder)
    results = []
    with dask_client(address, n_workers, processes) as client:
        logger.info("dask: %d worker(s) at %s", len(client.scheduler_info().get("workers", {})), client.scheduler.address)
        for input_path in inputs:
            output_path = predictor.output_path(input_path, out_dir, output_format)
            try:
                results.append(predict_file_dask(predictor, input_path, output_path, client))
            except LsmsegError as exc:
                logger.error("%s", exc)
                results.append(_failure(input_path, output_path, str(exc)))
            except Exception as exc:  # a worker died or a bug: report it, keep going
                message = f"{input_path}: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                logger.error("%s", message)
                results.append(_failure(input_path, output_path, message))
    return results
