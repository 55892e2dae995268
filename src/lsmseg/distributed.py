"""Blocks of one volume spread over dask.distributed workers, written into zarr regions.

A front end over the predictor's public API. The driver does what is decided once per volume
(percentiles, background level, the block plan; :meth:`Predictor.prepare`) and submits one task per
block. A worker opens the input lazily, runs the same block code as the single-process path
(:meth:`Predictor.load_block`, :meth:`Predictor.block_logits`), and writes its mask block into a
zarr array whose chunks are the blocks, so no two workers ever write the same chunk. The mask is
therefore identical to the single-process one. A TIFF or plane-folder output is then streamed from
the zarr, slab by slab.

    lsmseg predict in/ -o out/ --scheduler dask                        # LocalCluster on this machine
    lsmseg predict in/ -o out/ --scheduler dask --address tcp://host:8786   # an existing cluster
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .errors import InputError, LsmsegError, OutputError, one_line, printable
from .inference import BlockStats, Predictor, VolumeResult
from .inference.predictor import warn_constant
from .inference.preview import remove_stale_preview
from .inference.run import check_targets, guarded, postprocess_record, predict_file, write_provenance
from .io import (
    FORMATS, atomic_output, check_output_space, create_zarr_mask, mask_format_for, output_path_for, partial_path,
    read_volume, refuse_replacing_another_kind, remove_path, sweep_partials, write_mask_blocks,
)

logger = logging.getLogger(__name__)


def worker_number(name) -> int:
    """A worker's number from its name: a LocalCluster's ``0``, ``1``, ...; the trailing number of
    ``gpu-worker-3``; else a checksum of the name, the same in every process (``hash()`` of a
    string is not: two workers could take one GPU)."""
    match = re.search(r"(\d+)$", str(name))
    return int(match.group(1)) if match else zlib.crc32(str(name).encode())


def _worker_index() -> int:
    try:
        from distributed import get_worker

        return worker_number(get_worker().name)
    except (ImportError, ValueError):
        return 0


def _place_on_worker_device(predictor: Predictor) -> None:
    """One GPU per worker: worker i uses cuda:(i mod #GPUs) (its own copy of the predictor)."""
    import torch

    if predictor.device.type != "cuda" or not torch.cuda.is_available():
        return
    predictor.to(torch.device("cuda", _worker_index() % torch.cuda.device_count()))


@dataclass(frozen=True)
class BlockOutcome:
    """What a worker reports for one block: foreground voxels and which windows it skipped."""

    index: int
    foreground: int
    skip: list[bool] | None


@dataclass(frozen=True)
class BlockFailure:
    """What a worker reports for a block that failed: the exception, and its traceback as text."""

    index: int
    error: BaseException
    traceback: str


def run_block(predictor: Predictor, input_path: str, prepared_state: dict, block_index: int,
              zarr_path: str) -> BlockOutcome | BlockFailure:
    """Worker task: predict one block and write it into the zarr.

    A failure is returned, not raised: a task that raises has distributed log its traceback on the
    worker ("Compute Failed", many lines), beside the one ERROR line the driver logs for the volume.

    Args:
        predictor: the driver's predictor (scattered to every worker once).
        input_path: the volume (an absolute path: a worker may run in another folder), opened lazily.
        prepared_state: the volume's ``plan``, ``lo``, ``hi``, ``background`` and ``settings``.
        block_index: which block of the plan.
        zarr_path: the mask's zarr store (chunks are the plan's blocks; absolute too).
    """
    try:
        return _run_block(predictor, input_path, prepared_state, block_index, zarr_path)
    except Exception as exc:  # noqa: BLE001 - any failure goes back to the driver, which reports it
        error = exc
        try:
            pickle.loads(pickle.dumps(error))  # it travels back to the driver, and is rebuilt there
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its type and message can
            error = RuntimeError(f"{type(exc).__name__}: {exc}")
        return BlockFailure(block_index, error, traceback.format_exc())


def _run_block(predictor: Predictor, input_path: str, prepared_state: dict, block_index: int,
               zarr_path: str) -> BlockOutcome:
    import zarr

    _place_on_worker_device(predictor)
    plan, background = prepared_state["plan"], prepared_state["background"]
    block = plan.blocks[block_index]
    with _file_system_errors(InputError, input_path, "cannot read"):
        volume = read_volume(input_path, lazy=True)
        region, skip = predictor.load_block(
            plan, block, volume.data, prepared_state["lo"], prepared_state["hi"], background,
            on_raw=predictor.check_finite(volume.path),
        )
    settings = prepared_state["settings"]
    logits = predictor.block_logits(plan, block, region, skip, background, settings=settings)
    intensity = region[plan.output_in_region(block)]  # the floor's input, read once with the network's
    mask = predictor.mask_from_logits(logits, block.out, volume.shape, settings, intensity)
    with _file_system_errors(OutputError, zarr_path, "cannot write output"):
        zarr.open_array(str(Path(zarr_path) / "0"), mode="r+")[block.out] = mask
    return BlockOutcome(block_index, int(np.count_nonzero(mask)), skip)


@contextlib.contextmanager
def _file_system_errors(error: type, path, what: str):
    """A file system's ``OSError`` (it has an errno) as ``error(path, "what: reason")``: the input's
    while a block is read, the output's while it is written. A lost scheduler or a timeout (OSErrors
    without an errno) is neither and passes as it is, as do lsmseg's own errors."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, LsmsegError) or exc.errno is None:
            raise
        raise error(path, f"{what}: {exc.strerror or exc}") from exc


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
        except (ValueError, TypeError) as exc:  # distributed's parser: no port, a port that is no number, ...
            raise LsmsegError(f"{printable(address)}: not a dask scheduler address ({printable(exc)}); "
                              "expected e.g. tcp://host:8786") from None
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


def _worker_threads(client):
    """The torch threads of the workers that ran the blocks (dask sets OMP_NUM_THREADS per worker):
    one count, or the sorted counts when they differ; None when the workers cannot be asked."""
    try:
        counts = sorted(set(client.run(_torch_threads).values()))
    except Exception as exc:  # noqa: BLE001 - a record without the figure, never a failed volume
        logger.debug("cannot ask the dask workers for their threads: %s", exc)
        return None
    return counts[0] if len(counts) == 1 else counts or None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def predict_file_dask(predictor: Predictor, input_path, output_path, client, provenance_path=None) -> VolumeResult:
    """Segment one file with its blocks spread over ``client``'s workers.

    Args:
        predictor: the loaded predictor.
        input_path: the volume.
        output_path: the mask (its suffix picks the format).
        client: a ``distributed.Client``.
        provenance_path: the provenance JSON (default: beside the mask).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    start = time.perf_counter()
    volume = read_volume(input_path, lazy=True, max_voxels=predictor.options.max_voxels)
    check_output_space(output_path, volume.shape)
    mask_format = mask_format_for(output_path, volume)
    # A folder where a file goes (or the reverse) is refused now, not after every block has run.
    refuse_replacing_another_kind(output_path, FORMATS[mask_format].writes_folder)
    if predictor.network_shape(volume.shape, volume.spacing, volume.name) is not None:
        logger.info("%s: needs resampling, predicted in this process", input_path)
        return predict_file(predictor, input_path, output_path, provenance_path=provenance_path)
    prepared = predictor.prepare(volume)
    plan = prepared.plan
    read_s = time.perf_counter() - start
    state = {"plan": plan, "lo": prepared.lo, "hi": prepared.hi, "background": prepared.background,
             "settings": prepared.settings}
    stats = BlockStats.start(plan, prepared.background, scheduler="dask",
                             workers=len(client.scheduler_info().get("workers", {})))
    as_zarr = mask_format == "zarr"
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if as_zarr:
            store = stack.enter_context(atomic_output(output_path, folder=True))
        else:  # a scratch zarr beside the output, streamed into the output's format at the end
            store = partial_path(output_path, suffix=".zarr")
            stack.callback(remove_path, store)
        with _file_system_errors(OutputError, output_path, "cannot write output"):
            output_path.parent.mkdir(parents=True, exist_ok=True)
            create_zarr_mask(store, volume.shape, np.uint8, plan.block_size, volume.spacing, like=volume)
        if prepared.constant:
            warn_constant(input_path)
            outcomes = []
        else:
            outcomes = _run_blocks(predictor, client, input_path, output_path, state, Path(store), len(plan.blocks),
                                   volume.name)
        if not as_zarr:
            import zarr

            with _file_system_errors(OutputError, output_path, "cannot write output"):  # the scratch store, read back
                array = zarr.open_array(str(Path(store) / "0"), mode="r")
            blocks = ((block.out, np.asarray(array[block.out])) for block in plan.blocks)
            write_mask_blocks(blocks, output_path, volume.shape, like=volume)
    predict_s = time.perf_counter() - start
    for outcome in outcomes:
        stats.count(plan, plan.blocks[outcome.index], outcome.skip)
    remove_stale_preview(output_path)  # the workers draw no picture: the old one showed the replaced mask
    record = write_provenance(
        predictor, input_path, output_path, volume, provenance_path, stats=stats,
        foreground=sum(o.foreground for o in outcomes), timings={"read_s": read_s, "predict_s": predict_s},
        postprocess=postprocess_record(predictor, volume.name), threads=_worker_threads(client),
    )
    logger.info("%s -> %s (%.1f s on %d dask worker(s); %d of %d windows skipped as background)",
                printable(input_path), printable(output_path), read_s + predict_s, stats.workers,
                stats.windows_skipped, stats.windows)
    return VolumeResult.written(record)


def _run_blocks(predictor: Predictor, client, input_path: Path, output_path: Path, state: dict, store: Path,
                n_blocks: int, name: str) -> list[BlockOutcome]:
    from distributed import as_completed

    shared = client.scatter(predictor, broadcast=True)
    # Absolute paths: the workers of an existing cluster (--address) need not run in this folder.
    on_worker = input_path.absolute()
    prefix = f"lsmseg-block-{uuid.uuid4().hex}-"  # this volume's tasks
    futures = [
        client.submit(run_block, shared, str(on_worker), state, index, str(store.absolute()), pure=False,
                      key=f"{prefix}{index}")
        for index in range(n_blocks)
    ]
    results = []
    bar = tqdm(total=n_blocks, desc=name, unit="block", leave=False, disable=not predictor.options.progress)
    try:
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as exc:  # run_block returns its failures: this one failed around it
                # A worker that died (killed for memory, crashed) takes the scattered predictor with it:
                # distributed then says KilledWorker or "FutureCancelledError: ... already forgotten".
                # Every block is then lost at once, whichever ran where: none is named.
                if type(exc).__name__ in WORKER_LOST:
                    reason = (f"a dask worker died or left while running the volume's blocks ({type(exc).__name__}); "
                              "see the workers' logs (out of memory?)")
                else:  # e.g. a worker of an existing cluster (--address) that cannot unpickle the task
                    reason = f"a dask task failed around the block ({type(exc).__name__}: {exc})"
                raise LsmsegError(one_line(input_path, reason)) from exc
            if isinstance(outcome, BlockFailure):
                logger.debug("block %d of %s failed on its worker:\n%s", outcome.index, input_path, outcome.traceback)
                error = outcome.error
                if type(error) in (InputError, OutputError) and error.path == on_worker:
                    error = type(error)(input_path, error.reason)  # the input named as it was given
                elif type(error) is OutputError and error.path == store.absolute():
                    error = OutputError(output_path, error.reason)  # the scratch store stands for the output
                raise error
            results.append(outcome)
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        # A cancelled block that a worker is running still writes its mask when it ends: the store
        # is removed after that, or the write would leave a .partial-* store behind.
        _wait_for_running(client, prefix)
        raise
    finally:
        bar.close()
    return results


# What distributed raises for a task whose worker died or left (by name: its modules move between versions).
WORKER_LOST = frozenset({"KilledWorker", "FutureCancelledError", "CancelledError", "CommClosedError"})

# How long a failed volume waits for its running blocks to end (a block takes minutes on a CPU).
RUNNING_BLOCKS_WAIT_S = 600.0


def _wait_for_running(client, prefix: str, timeout: float | None = None) -> None:
    """Wait until no worker runs a task whose key starts with ``prefix`` (cancelled ones included).

    Args:
        client: the ``distributed.Client``.
        prefix: the volume's task keys.
        timeout: seconds; default :data:`RUNNING_BLOCKS_WAIT_S`.
    """
    deadline = time.monotonic() + (RUNNING_BLOCKS_WAIT_S if timeout is None else timeout)
    told = False
    while True:
        running = _count_running(client, prefix, max(deadline - time.monotonic(), 0.0) + 1.0)
        if running is None:  # workers that cannot be asked (gone) write nothing either; a hung one is left
            return
        if not running:
            return
        if not told:  # an interrupted run does not look hung
            logger.info("waiting for %d cancelled block(s) still running on dask workers to end", running)
            told = True
        if time.monotonic() > deadline:
            logger.warning("%d cancelled block(s) still running on dask workers; a .partial-* store they write "
                           "is removed by the next run", running)
            return
        time.sleep(0.2)


def _count_running(client, prefix: str, timeout: float) -> int | None:
    """How many ``prefix`` tasks the workers run; None when they cannot be asked within ``timeout``
    seconds (``Client.run`` has no timeout of its own: a worker whose event loop hangs would hold it)."""
    answer: list = []

    def ask():
        try:
            answer.append(sum(len(keys) for keys in client.run(_running_keys, prefix).values()))
        except Exception as exc:  # noqa: BLE001 - said below, at debug level
            answer.append(exc)

    asking = threading.Thread(target=ask, name="lsmseg-ask-workers", daemon=True)
    asking.start()
    asking.join(timeout)
    if not answer or isinstance(answer[0], Exception):
        logger.debug("cannot ask the dask workers what they run: %s", answer[0] if answer else "no answer in time")
        return None
    return answer[0]


def _running_keys(prefix: str, dask_worker=None) -> list[str]:
    """The keys starting with ``prefix`` that occupy a thread of this worker (``client.run`` passes it)."""
    return [str(ts.key) for ts in dask_worker.state.all_running_tasks if str(ts.key).startswith(prefix)]


def predict_files_dask(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    output_format: str = "same",
    address: str | None = None,
    n_workers: int | None = None,
    processes: bool = True,
    input_folders: Sequence[str | Path] = (),
) -> list[VolumeResult]:
    """Like :func:`lsmseg.inference.predict_files`, with each volume's blocks spread over dask workers.

    Args:
        predictor: the loaded predictor.
        inputs: the volumes.
        out_dir: the output folder.
        output_format: ``"same"`` or ``"zarr"`` (as for ``predict_files``).
        address: a dask scheduler's address; None: a LocalCluster on this machine.
        n_workers: the LocalCluster's workers (default: one per GPU, or 1).
        processes: LocalCluster workers in processes (False: threads, for tests).
        input_folders: the folders the inputs were listed from (as for ``predict_files``).

    Raises:
        ValueError: the predictor's options ask for probability maps or preview pictures, which
            the workers do not write.
    """
    for wanted, what in ((predictor.options.probabilities_dir, "probability maps"), (predictor.options.preview, "preview pictures")):
        if wanted:
            raise ValueError(f"{what} are not written with dask; run predict_files for them")
    outputs = [output_path_for(p, out_dir, output_format) for p in inputs]
    refused = check_targets(inputs, outputs, None, input_folders)  # before any work, as predict_files
    for folder in {Path(o).parent for o in outputs}:
        sweep_partials(folder)
    results = []
    with dask_client(address, n_workers, processes) as client:
        logger.info("dask: %d worker(s) at %s", len(client.scheduler_info().get("workers", {})), client.scheduler.address)
        for index, (input_path, output_path) in enumerate(zip(inputs, outputs)):
            if index in refused:
                results.append(VolumeResult.failed(input_path, output_path, str(refused[index])))
                continue
            results.append(guarded(lambda: predict_file_dask(predictor, input_path, output_path, client),
                                   input_path, output_path))
    return results
