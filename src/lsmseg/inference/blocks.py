"""Block-wise sliding-window inference on a global window grid.

A volume of any size is cut into output blocks. The window grid is the whole (padded) volume's
(:func:`lsmseg.inference.windows.window_starts`), never a per-block grid, and each block runs *every* window
that intersects it, accumulating weighted logits only on its own voxels. A voxel therefore sees
exactly the windows it sees in a one-pass prediction, blended in the same order, and the block-wise
result equals the in-memory one for any block size. A window straddling a block border runs in the
first block that needs it; its weighted logits are kept (:class:`WindowCache`, up to a memory cap)
for the later blocks, which add them in their scan order as if they had run it.

Memory per block: its input region (the block plus up to one window on each side) as float32, and
two float32 accumulators of the block's size - independent of the volume's size. On a GPU the
accumulators live in device memory when they fit (:func:`accumulation_device`), else on the host.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..normalise import normalise
from .windows import axis_starts, grid_step, pad_widths

Slices = tuple[slice, slice, slice]

# Default output block size for lazily read volumes: at most 256^3 voxels (the input region is then
# ~130 MB of float32). Windows on a block border run once per block, so a volume is cut as little as
# the budget allows (see default_block_shape), not into fixed cubes.
DEFAULT_BLOCK_EDGE = 256
DEFAULT_BLOCK_VOXELS = DEFAULT_BLOCK_EDGE ** 3


def default_block_shape(shape: Sequence[int], budget: int = DEFAULT_BLOCK_VOXELS,
                        stride: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The fewest cuts that bring a block under ``budget`` voxels: halve the longest axis until it fits.

    A 32x448x448 volume stays one block (fixed 256-cubes would cut it in four and re-run a row of
    windows at each cut); a whole organ still gets blocks of ~256^3.

    Args:
        shape: the volume's shape.
        budget: the most voxels a block may hold (exceeded by under a ``stride`` per axis when
            aligning).
        stride: the window grid's step per axis (:func:`grid_stride`); if given, each cut edge is
            rounded up to a multiple of it, so that a cut lies on the grid and one row of windows
            straddles it, not two (a 1000x2000x2000 volume: 1.30x the windows run block by block
            instead of 1.65x, before the window cache).
    """
    block = [max(1, int(s)) for s in shape]
    while math.prod(block) > budget:
        axis = int(np.argmax(block))
        block[axis] = -(-block[axis] // 2)
    if stride is not None:
        block = [size if edge >= size else min(size, -(-edge // step) * step)
                 for edge, size, step in zip(block, shape, stride)]
    return tuple(block)  # type: ignore[return-value]


def grid_stride(roi: Sequence[int], overlap: float) -> tuple[int, int, int]:
    """The window grid's step per axis inside a volume longer than the window (MONAI's interval)."""
    return tuple(grid_step(r, overlap) for r in roi)  # type: ignore[return-value]


@dataclass(frozen=True)
class Block:
    """One output block: the voxels it writes and the windows that cover them."""

    index: int
    out: Slices  # voxels written, in volume coordinates
    window_ranges: tuple[tuple[int, int], ...]  # per axis [first, last) into BlockPlan.axis_starts
    region: Slices  # union of its windows, in padded coordinates

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.out)  # type: ignore[return-value]

    @property
    def n_windows(self) -> int:
        return math.prod(b - a for a, b in self.window_ranges)


@dataclass(frozen=True)
class BlockPlan:
    """How a volume of ``shape`` is cut into blocks, and the global window grid over it."""

    shape: tuple[int, int, int]
    roi: tuple[int, int, int]
    overlap: float
    pad: tuple[tuple[int, int], ...]  # symmetric padding that makes every axis >= roi (MONAI's)
    axis_starts: tuple[tuple[int, ...], ...]  # window starts per axis, padded coordinates
    block_size: tuple[int, int, int]
    blocks: tuple[Block, ...]

    @property
    def n_windows(self) -> int:
        return math.prod(len(s) for s in self.axis_starts)

    def window_corners(self, block: Block) -> list[tuple[int, int, int]]:
        """The block's windows (padded coordinates) in the global scan order (last axis fastest)."""
        ranges = [self.axis_starts[axis][a:b] for axis, (a, b) in enumerate(block.window_ranges)]
        return [(z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]]

    def window_ids(self, block: Block) -> list[int]:
        """Global index of each of the block's windows (same order as :meth:`window_corners`)."""
        counts = [len(s) for s in self.axis_starts]
        (z0, z1), (y0, y1), (x0, x1) = block.window_ranges
        return [(z * counts[1] + y) * counts[2] + x for z in range(z0, z1) for y in range(y0, y1) for x in range(x0, x1)]

    def part_beyond(self, block: Block, corner: Sequence[int]) -> Slices:
        """The box of a window (at ``corner``, padded coordinates; window-relative slices) that holds
        every voxel of it another block owns: what a later block may take from the window cache.

        A block owns its output voxels and, where it meets the volume's edge, the padding beyond it.
        A window reaching past its block along one axis only is needed beyond that cut alone (a
        window on a z cut: its part in the next z block, about half of it); one reaching past along
        two or more axes, or past both ends of one, keeps its whole box.
        """
        whole = tuple(slice(0, r) for r in self.roi)
        reaching = []  # (axis, past the low end, past the high end, the cut there)
        for axis, out in enumerate(block.out):
            low = out.start + self.pad[axis][0] if out.start > 0 else -math.inf
            high = out.stop + self.pad[axis][0] if out.stop < self.shape[axis] else math.inf
            below, above = corner[axis] < low, corner[axis] + self.roi[axis] > high
            if below or above:
                reaching.append((axis, below, above, low if below else high))
        if len(reaching) != 1 or (reaching[0][1] and reaching[0][2]):
            return whole
        axis, below, _, cut = reaching[0]
        cut = int(cut) - corner[axis]
        part = slice(0, cut) if below else slice(cut, self.roi[axis])
        return tuple(part if a == axis else whole[a] for a in range(3))  # type: ignore[return-value]

    def output_in_region(self, block: Block) -> Slices:
        """Where the block's output voxels lie in its region (:meth:`read_region`'s array)."""
        return tuple(slice(out.start + self.pad[axis][0] - part.start, out.stop + self.pad[axis][0] - part.start)
                     for axis, (out, part) in enumerate(zip(block.out, block.region)))

    def read_region(
        self, source, block: Block, lo: float | None, hi: float | None, on_raw: Callable | None = None,
        upper_tail: str = "clip",
    ) -> np.ndarray:
        """The block's input region, normalised to float32, zero where it lies in the padding.

        ``source`` is a numpy array or a lazy array-like; only the region is read. ``lo, hi`` are
        the volume's normalisation range; ``None`` means ``source`` is normalised already.
        ``upper_tail`` is :func:`lsmseg.normalise.normalise`'s.
        ``on_raw(data)`` sees the raw data first (the predictor checks it for NaN/Inf).
        """
        region = np.zeros([s.stop - s.start for s in block.region], dtype=np.float32)
        inside, local = [], []
        for axis, part in enumerate(block.region):
            before = self.pad[axis][0]
            start, stop = max(part.start - before, 0), min(part.stop - before, self.shape[axis])
            inside.append(slice(start, stop))
            local.append(slice(start + before - part.start, stop + before - part.start))
        data = np.asarray(source[tuple(inside)])
        if on_raw is not None:
            on_raw(data)
        if lo is None:
            region[tuple(local)] = data
        else:
            region[tuple(local)] = normalise(data, lo, hi, upper_tail)
        return region


def _axis_blocks(size: int, edge: int) -> list[tuple[int, int]]:
    return [(start, min(start + edge, size)) for start in range(0, size, edge)]


def normalise_block_size(block_size: int | Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """A per-axis block size: ``None`` is one block, an int is a cube, capped at the volume.

    Args:
        block_size: None, one edge, or three (z, y, x).
        shape: the volume's shape.
    """
    if block_size is None:
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    sizes = (block_size,) * 3 if isinstance(block_size, (int, np.integer)) else tuple(block_size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"block size must be one or three positive integers, got {block_size!r}")
    return tuple(min(int(b), int(s)) for b, s in zip(sizes, shape))  # type: ignore[return-value]


def plan_blocks(
    shape: Sequence[int],
    roi: Sequence[int],
    overlap: float,
    block_size: int | Sequence[int] | None = None,
) -> BlockPlan:
    """Cut ``shape`` into blocks of ``block_size`` (z-major order) over the global window grid.

    Args:
        shape: the volume's shape (z, y, x).
        roi: the window (the model's training ROI).
        overlap: overlap of neighbouring windows as a fraction of the window (MONAI's grid).
        block_size: output block edge(s) in voxels; None: one block.
    """
    shape = tuple(int(s) for s in shape)
    roi = tuple(int(r) for r in roi)
    pad = pad_widths(shape, roi)
    padded = [s + a + b for s, (a, b) in zip(shape, pad)]
    starts = tuple(tuple(axis_starts(p, r, overlap)) for p, r in zip(padded, roi))
    size = normalise_block_size(block_size, shape)
    per_axis = []
    for axis in range(3):
        entries = []
        for start, stop in _axis_blocks(shape[axis], size[axis]):
            # Windows intersecting [start, stop) in padded coordinates: w < stop and w + roi > start.
            lo_p, hi_p = start + pad[axis][0], stop + pad[axis][0]
            first = bisect.bisect_right(starts[axis], lo_p - roi[axis])
            last = bisect.bisect_left(starts[axis], hi_p)
            region = slice(starts[axis][first], starts[axis][last - 1] + roi[axis])
            entries.append((slice(start, stop), (first, last), region))
        per_axis.append(entries)
    blocks = []
    for z in per_axis[0]:
        for y in per_axis[1]:
            for x in per_axis[2]:
                blocks.append(
                    Block(
                        index=len(blocks),
                        out=(z[0], y[0], x[0]),
                        window_ranges=(z[1], y[1], x[1]),
                        region=(z[2], y[2], x[2]),
                    )
                )
    return BlockPlan(shape, roi, float(overlap), pad, starts, size, tuple(blocks))  # type: ignore[arg-type]


# Accumulators may take at most this share of a GPU's free memory: the rest stays for the network's
# activations (not yet reserved before a volume's first batch) and for other processes.
DEVICE_MEMORY_SHARE = 0.5


def accumulator_bytes(shape: Sequence[int]) -> int:
    """Bytes of a block's two float32 accumulators (weighted logits, weight sum)."""
    return 2 * 4 * math.prod(int(s) for s in shape)


def accumulation_device(
    device: torch.device, shape: Sequence[int], free_memory: Callable[[torch.device], int] | None = None
) -> torch.device | None:
    """Where a block of ``shape`` is blended: ``device`` if it is a GPU whose free memory holds the
    block's accumulators (at most :data:`DEVICE_MEMORY_SHARE` of it), else None (the host).

    Args:
        device: the network's device.
        shape: the block's shape.
        free_memory: free bytes on a device; default ``torch.cuda.mem_get_info(device)[0]`` (tests
            pass a fake).
    """
    if device.type != "cuda":
        return None
    free = free_memory(device) if free_memory is not None else torch.cuda.mem_get_info(device)[0]
    return device if accumulator_bytes(shape) <= DEVICE_MEMORY_SHARE * free else None


# What a volume's window cache may hold (:class:`WindowCache`): 1 GiB is 2048 whole windows of
# 32x64x64, or about twice as many kept parts. A 1000x2000x2000 volume in 256^3 blocks then runs
# 1.03x its distinct windows (1.57 GB would make it 1.00x; 1.30x without a cache:
# benchmarks/window_reuse.py).
DEFAULT_WINDOW_CACHE_BYTES = 1 << 30


class WindowCache:
    """Weighted window logits shared between the blocks of one volume, so that a window straddling
    block borders runs once.

    The first block that runs a window :meth:`put`-s its weighted logits (the part other blocks own,
    :meth:`BlockPlan.part_beyond`) if a later block needs the window too and the cache has room
    (else that block runs it again); later blocks :meth:`get` it.
    :meth:`release` after each block drops the entries no later block needs, so the cache holds
    only windows on the cuts not yet passed (z-major blocks: the current z-row's y and x cuts and
    the next z cut).

    Args:
        plan: the volume's block plan (the blocks, in the order they are computed).
        max_bytes: the most the entries may hold; 0 turns reuse off.
    """

    def __init__(self, plan: BlockPlan, max_bytes: int = DEFAULT_WINDOW_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        # Blocks still to come that need each window (windows of one block only are left out).
        counts = Counter(i for block in plan.blocks for i in plan.window_ids(block))
        self.remaining = {i: n for i, n in counts.items() if n > 1}
        self.entries: dict[int, object] = {}
        self.bytes = 0
        self.reused = 0  # windows taken from the cache instead of run, over the volume

    def get(self, window_id: int):
        """``(part, offset)`` stored for a window, or None; counts a reuse when found. ``part`` holds
        the window's weighted logits from ``offset`` (per axis, window-relative) on."""
        value = self.entries.get(window_id)
        self.reused += value is not None
        return value

    def wants(self, window_id: int) -> bool:
        """Whether a later block needs this window and it is not stored yet."""
        return self.remaining.get(window_id, 0) > 1 and window_id not in self.entries

    def put(self, window_id: int, part, offset: Sequence[int] = (0, 0, 0)) -> None:
        """Keep ``part`` of a window's weighted logits (NumPy array or tensor, starting at ``offset``
        in the window) if a later block needs it and it fits."""
        if not self.wants(window_id):
            return
        size = int(part.nbytes)
        if self.bytes + size <= self.max_bytes:
            # A copy: a view would keep the whole batch's array alive.
            stored = part.copy() if isinstance(part, np.ndarray) else part.clone()
            self.entries[window_id] = (stored, tuple(int(o) for o in offset))
            self.bytes += size

    def release(self, window_ids: Iterable[int]) -> None:
        """One block is done with ``window_ids``: drop the entries of windows no later block needs."""
        for i in window_ids:
            left = self.remaining.get(i)
            if left is None:
                continue
            if left <= 1:
                del self.remaining[i]
                value = self.entries.pop(i, None)
                if value is not None:
                    self.bytes -= int(value[0].nbytes)
            else:
                self.remaining[i] = left - 1


def accumulate_block(
    plan: BlockPlan,
    block: Block,
    region: np.ndarray,
    run_windows: Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    batch_size: int,
    skip: Sequence[bool] | None = None,
    background_logits: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    cache: WindowCache | None = None,
) -> np.ndarray:
    """Blended logits (float32) on ``block.out`` from every window that intersects the block.

    Windows flagged in ``skip`` are not run: they contribute ``background_logits`` (the model's
    output for a uniform dark window) with their usual weight. Windows are added to each voxel in
    the global scan order, so the sums match a one-block pass exactly.

    The two float32 accumulators are NumPy arrays on the host, or torch tensors on ``device``. On a
    GPU (as nnU-Net's predictor blends) no batch comes back to the host: windows go up from pinned
    memory without blocking, and only the finished block comes down. Both take the same float32
    adds in the same order: with ``device="cpu"`` the result is bit-identical to the host's.

    Args:
        plan: the volume's block plan.
        block: the block to compute.
        region: the block's normalised input region (:meth:`BlockPlan.read_region`).
        run_windows: the network: a batch (N, 1, *roi) of windows -> logits (N, C, *roi), best
            already on ``device``.
        weights: the blending weights of one window (:func:`lsmseg.inference.windows.blend_weights`).
        batch_size: windows per call of ``run_windows``.
        skip: per window of the block (in :meth:`BlockPlan.window_corners` order), whether it is dark.
        background_logits: what a skipped window contributes (needed when any is skipped).
        device: where the accumulators live; None: on the host (:func:`accumulation_device` chooses).
        cache: the volume's :class:`WindowCache`: windows found there are not run, windows run
            here that later blocks need are stored there, and the block's windows are released
            from it at the end; None: every window runs.
    """
    on_host = device is None
    compute = torch.device("cpu") if on_host else torch.device(device)  # where window products are taken
    pinned = compute.type == "cuda"
    roi = plan.roi
    corners = plan.window_corners(block)
    skip = list(skip) if skip is not None else [False] * len(corners)
    ids = plan.window_ids(block) if cache is not None else None
    out_start = [s.start + plan.pad[axis][0] for axis, s in enumerate(block.out)]
    out_shape = block.shape

    # The host blends in NumPy: single-threaded, it measured faster there than torch's small ops
    # (which compete with the network for the same cores); the indexing below is the same for both.
    def zeros():
        return np.zeros(out_shape, np.float32) if on_host else torch.zeros(out_shape, dtype=torch.float32, device=compute)

    def stored(tensor: torch.Tensor):
        return tensor.numpy() if on_host else tensor

    accumulated, weight_sum = zeros(), zeros()
    weights = weights.to(compute)
    weights_stored = stored(weights)
    background_weighted = stored(background_logits.to(compute) * weights) if background_logits is not None else None
    source = torch.from_numpy(region)
    origin = [s.start for s in block.region]

    def target(corner):
        """(window slice, block slice) of the window's intersection with the block."""
        window_part, block_part = [], []
        for axis in range(3):
            lo = max(corner[axis], out_start[axis])
            hi = min(corner[axis] + roi[axis], out_start[axis] + out_shape[axis])
            window_part.append(slice(lo - corner[axis], hi - corner[axis]))
            block_part.append(slice(lo - out_start[axis], hi - out_start[axis]))
        return tuple(window_part), tuple(block_part)

    def as_stored(value):
        """A cached part where this block blends (an earlier block may have blended elsewhere)."""
        if on_host:
            return value.cpu().numpy() if isinstance(value, torch.Tensor) else value
        return value if isinstance(value, torch.Tensor) else torch.from_numpy(value).to(compute)

    def flush(chunk: list[int], cached: dict) -> None:
        run = [i for i in chunk if not skip[i] and i not in cached]
        logits = {i: (as_stored(part), offset) for i, (part, offset) in cached.items()}
        if run:
            # Stacked straight into pinned memory for a GPU, so that the upload does not block.
            windows = torch.empty((len(run), *roi), dtype=torch.float32, pin_memory=pinned)
            torch.stack([source[tuple(slice(c - o, c - o + r) for c, o, r in zip(corners[i], origin, roi))]
                         for i in run], out=windows)
            weighted = stored(run_windows(windows[:, None])[:, 0].to(compute) * weights)
            logits.update((i, (value, (0, 0, 0))) for i, value in zip(run, weighted))
            if cache is not None:
                for i, value in zip(run, weighted):
                    if cache.wants(ids[i]):
                        part = plan.part_beyond(block, corners[i])
                        cache.put(ids[i], value[part], [s.start for s in part])
        for i in chunk:  # in scan order, so that sums are bit-identical to a one-block pass
            window_part, block_part = target(corners[i])
            if i in logits:
                value, offset = logits[i]
                accumulated[block_part] += value[tuple(slice(s.start - o, s.stop - o)
                                                       for s, o in zip(window_part, offset))]
            else:
                accumulated[block_part] += background_weighted[window_part]
            weight_sum[block_part] += weights_stored[window_part]

    chunk: list[int] = []
    cached: dict[int, object] = {}  # the chunk's windows found in the cache
    pending = 0
    for i in range(len(corners)):
        chunk.append(i)
        if not skip[i]:
            value = cache.get(ids[i]) if cache is not None else None
            if value is not None:
                cached[i] = value
            else:
                pending += 1
        if pending == batch_size:
            flush(chunk, cached)
            chunk, cached, pending = [], {}, 0
    if chunk:
        flush(chunk, cached)
    if cache is not None:
        cache.release(ids)
    accumulated /= weight_sum
    if on_host:
        return accumulated
    if pinned:  # down into pinned memory (non_blocking allocates it there), then wait for the copy
        accumulated = accumulated.to("cpu", non_blocking=True)
        torch.cuda.current_stream(compute).synchronize()
    return accumulated.numpy()


def prefetched(items: Iterable, load: Callable, enabled: bool = True) -> Iterator[tuple]:
    """Yield ``(item, load(item))``, loading the next item in a thread while the caller works.

    Reading and normalising the next block overlaps the model's work on the current one.

    Args:
        items: what to load, in order.
        load: the loader, called once per item.
        enabled: False loads in the caller's thread (no gain on a CPU the network already fills).
    """
    items = list(items)
    if not enabled or len(items) < 2:
        for item in items:
            yield item, load(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsmseg-prefetch") as pool:
        future = pool.submit(load, items[0])
        for index, item in enumerate(items):
            result = future.result()
            if index + 1 < len(items):
                future = pool.submit(load, items[index + 1])
            yield item, result
