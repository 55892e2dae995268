"""Block-wise prediction: exactness across block borders, lazy files, block-by-block writers."""

import errno
import json
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.inference import Predictor, RunOptions, predict_file, predict_files
from lsmseg.inference.blocks import WindowCache, plan_blocks
from lsmseg.inference.windows import pad_widths, window_starts

ROI = (32, 64, 64)


@pytest.fixture(scope="module")
def conv_model():
    """A small convolutional stand-in for Swin UNETR: exactness does not depend on the network,
    and it keeps these tests fast on two shared cores."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 3, padding=1)
    ).eval()


def make_predictor(model, config, **options):
    options.setdefault("progress", False)
    # engine torch: exactness is the block engine's; the runtime has its own test
    return Predictor(model, config, InferenceSettings(overlap=0.5), device="cpu", engine="torch",
                     options=RunOptions(**options))


@pytest.mark.parametrize("shape, block", [((40, 70, 80), (16, 24, 40)), ((10, 40, 20), 7), ((64, 130, 64), (32, 64, 64))])
def test_plan_covers_every_voxel_once_with_exactly_the_intersecting_windows(shape, block):
    plan = plan_blocks(shape, ROI, 0.5, block)
    count = np.zeros(shape, np.int32)
    pad = pad_widths(shape, ROI)
    padded = [s + a + b for s, (a, b) in zip(shape, pad)]
    every_window = window_starts(padded, ROI, 0.5)
    assert plan.n_windows == len(every_window)
    for b in plan.blocks:
        count[b.out] += 1
        lo = [s.start + p for s, (p, _) in zip(b.out, pad)]
        hi = [s.stop + p for s, (p, _) in zip(b.out, pad)]
        expected = [w for w in every_window if all(w[a] < hi[a] and w[a] + ROI[a] > lo[a] for a in range(3))]
        assert plan.window_corners(b) == expected  # same windows, global scan order
        ids = plan.window_ids(b)
        assert [every_window[i] for i in ids] == expected
        region = [(s.start, s.stop) for s in b.region]
        assert region == [(min(w[a] for w in expected), max(w[a] for w in expected) + ROI[a]) for a in range(3)]
    assert (count == 1).all()


@pytest.mark.parametrize("shape, block", [((40, 70, 80), (16, 24, 40)), ((10, 40, 20), 7)])
def test_output_in_region_is_the_blocks_own_voxels(shape, block):
    # The intensity floor takes a block's voxels from the region read for the network (no second read).
    source = np.random.default_rng(0).random(shape, dtype=np.float32)
    plan = plan_blocks(shape, ROI, 0.5, block)
    for b in plan.blocks:
        region = plan.read_region(source, b, None, None)
        np.testing.assert_array_equal(region[plan.output_in_region(b)], source[b.out])


@pytest.mark.parametrize("skip_background", [False, True])
def test_many_blocks_give_exactly_the_one_block_result(conv_model, tiny_model_config, skip_background):
    rng = np.random.default_rng(0)
    volume = rng.integers(100, 4000, (40, 100, 200)).astype(np.uint16)
    volume[:, :, :110] = rng.integers(95, 105, (40, 100, 110))  # a dark side, so that windows are skipped
    whole = make_predictor(conv_model, tiny_model_config, skip_background=skip_background)
    split = make_predictor(conv_model, tiny_model_config, skip_background=skip_background, block_size=(20, 50, 70),
                           prefetch=True)  # the next block is read in a thread: same result
    logits_whole, stats_whole = whole.logits_with_stats(volume)
    logits_split, stats_split = split.logits_with_stats(volume)
    assert stats_split.blocks == 2 * 2 * 3 and stats_whole.blocks == 1
    assert stats_split.skipped == stats_whole.skipped  # the same windows, whichever block they touch
    assert (stats_whole.windows_skipped > 0) == skip_background
    # A window on a block border runs once, in the first block that needs it; the later blocks take
    # it from the window cache. A skipped one is counted once.
    assert stats_split.window_runs == stats_whole.window_runs == stats_whole.windows - stats_whole.windows_skipped
    assert stats_split.windows_reused > 0 and stats_whole.windows_reused == 0
    np.testing.assert_array_equal(logits_split, logits_whole)  # same windows, same order: bit-identical
    threshold = np.float32(np.median(logits_whole))
    np.testing.assert_array_equal(logits_split >= threshold, logits_whole >= threshold)


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_a_small_or_no_window_cache_runs_border_windows_again_with_the_same_result(conv_model, tiny_model_config,
                                                                                     cache_mb):
    # 1 MB holds two 32x64x64 windows: most border windows do not fit and run once per block they touch.
    volume = np.random.default_rng(3).integers(100, 4000, (40, 100, 200)).astype(np.uint16)
    calls = []
    whole = make_predictor(conv_model, tiny_model_config, skip_background=False)
    split = make_predictor(conv_model, tiny_model_config, skip_background=False, block_size=(20, 50, 70),
                           window_cache_mb=cache_mb)
    run_windows = split.run_windows
    split.run_windows = lambda windows, **kw: calls.append(len(windows)) or run_windows(windows, **kw)
    logits_whole, stats_whole = whole.logits_with_stats(volume)
    logits_split, stats_split = split.logits_with_stats(volume)
    # Same windows in the same order, but batched differently: the stand-in's convolution takes another
    # kernel for a batch of one window (3e-7 apart), which a partly full cache produces here.
    np.testing.assert_allclose(logits_split, logits_whole, rtol=0, atol=1e-6)
    assert stats_split.window_runs == sum(calls)  # counted as the network ran them
    per_block = sum(b.n_windows for b in plan_blocks(volume.shape, ROI, 0.5, (20, 50, 70)).blocks)
    assert stats_split.window_runs + stats_split.windows_reused == per_block
    if cache_mb == 0:
        assert stats_split.windows_reused == 0 and stats_split.window_runs == per_block
    else:
        assert 0 < stats_split.windows_reused and stats_whole.window_runs < stats_split.window_runs < per_block


def test_blocks_larger_than_a_window_reuse_the_kept_parts_of_border_windows(conv_model, tiny_model_config):
    # Blocks of one window or more: windows on a single cut are kept cropped to their part beyond it.
    volume = np.random.default_rng(4).integers(100, 4000, (64, 130, 150)).astype(np.uint16)
    whole = make_predictor(conv_model, tiny_model_config, skip_background=False)
    split = make_predictor(conv_model, tiny_model_config, skip_background=False, block_size=(32, 64, 64))
    logits_whole, stats_whole = whole.logits_with_stats(volume)
    logits_split, stats_split = split.logits_with_stats(volume)
    assert stats_split.window_runs == stats_whole.window_runs and stats_split.windows_reused > 0
    # Batched differently (see above): equal up to the stand-in's batch-of-one kernel.
    np.testing.assert_allclose(logits_split, logits_whole, rtol=0, atol=1e-6)


def test_window_cache_keeps_only_what_later_blocks_need():
    plan = plan_blocks((40, 100, 200), ROI, 0.5, (20, 50, 70))
    cache = WindowCache(plan)
    window = np.ones(ROI, np.float32)
    shared = set()
    for block in plan.blocks:
        for i in plan.window_ids(block):
            if cache.get(i) is None:
                cache.put(i, window)
            else:
                shared.add(i)
        cache.release(plan.window_ids(block))
        # Held: windows of this block that a block still to come needs, and nothing else.
        later = {i for b in plan.blocks[block.index + 1:] for i in plan.window_ids(b)}
        assert set(cache.entries) <= later
        assert cache.bytes == len(cache.entries) * window.nbytes
    assert cache.entries == {} and cache.bytes == 0 and cache.remaining == {}
    counts = {}
    for block in plan.blocks:
        for i in plan.window_ids(block):
            counts[i] = counts.get(i, 0) + 1
    assert shared == {i for i, n in counts.items() if n > 1}
    assert cache.reused == sum(n - 1 for n in counts.values())
    with pytest.raises(ValueError, match="max_bytes"):
        WindowCache(plan, -1)


# Blocks smaller than a window: every window reaches past several cuts and is kept whole.
@pytest.mark.parametrize("shape, block, some_cropped", [((40, 100, 200), (20, 50, 70), False),
                                                        ((10, 40, 200), (7, 40, 64), True),
                                                        ((64, 130, 64), (32, 64, 64), True),
                                                        ((96, 256, 256), (48, 128, 128), True)])
def test_the_part_kept_for_later_blocks_holds_all_they_take(shape, block, some_cropped):
    plan = plan_blocks(shape, ROI, 0.5, block)
    cropped = 0
    for b in plan.blocks:
        for corner in plan.window_corners(b):
            part = plan.part_beyond(b, corner)
            cropped += part != tuple(slice(0, r) for r in ROI)
            for later in plan.blocks[b.index + 1:]:
                if corner not in plan.window_corners(later):
                    continue
                for axis, out in enumerate(later.out):  # the later block's voxels of this window
                    lo = out.start + plan.pad[axis][0] - corner[axis]
                    hi = out.stop + plan.pad[axis][0] - corner[axis]
                    lo, hi = max(lo, 0), min(hi, ROI[axis])
                    assert part[axis].start <= lo and hi <= part[axis].stop
    assert (cropped > 0) == some_cropped  # windows on one cut keep only their part beyond it


def test_lazy_file_prediction_equals_in_memory(conv_model, tiny_model_config, tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(100, 4000, (36, 80, 72)).astype(np.uint16)
    io.write_volume(volume, tmp_path / "v.tif", spacing=(2.0, 1.0, 1.0))
    predictor = make_predictor(conv_model, tiny_model_config, block_size=(20, 32, 40))
    expected = make_predictor(conv_model, tiny_model_config).predict_volume(volume)
    record = predict_file(predictor, tmp_path / "v.tif", tmp_path / "out" / "v.tif").record
    written = io.read_volume(tmp_path / "out" / "v.tif")
    np.testing.assert_array_equal(written.load(), expected)
    np.testing.assert_allclose(written.spacing, (2.0, 1.0, 1.0), rtol=1e-5)
    assert record["blocks"]["blocks"] == 2 * 3 * 2
    assert record["foreground_fraction"] == pytest.approx(expected.mean())
    provenance = json.loads((tmp_path / "out" / "v.tif.provenance.json").read_text())
    assert provenance["blocks"]["windows"] == record["blocks"]["windows"] > 0


def test_log_upper_tail_reaches_every_path(conv_model, tiny_model_config, tmp_path):
    """upper_tail "log" is applied alike in memory and block by block from a file."""
    rng = np.random.default_rng(2)
    volume = rng.integers(100, 1000, (36, 80, 72)).astype(np.uint16)
    volume[10:20, 20:40, 20:40] = rng.integers(5000, 20000, (10, 20, 20))  # a tail far above the 99.5th percentile
    io.write_volume(volume, tmp_path / "v.tif")
    settings = InferenceSettings(overlap=0.5, upper_tail="log")
    memory = Predictor(conv_model, tiny_model_config, settings, device="cpu", engine="torch",
                       options=RunOptions(progress=False))
    blockwise = Predictor(conv_model, tiny_model_config, settings, device="cpu", engine="torch",
                          options=RunOptions(progress=False, block_size=(20, 32, 40)))
    clipped = make_predictor(conv_model, tiny_model_config)
    expected = memory.predict_logits(volume)
    assert not np.allclose(expected, clipped.predict_logits(volume))  # the tail changed the input
    predict_file(blockwise, tmp_path / "v.tif", tmp_path / "out" / "v.tif")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "out" / "v.tif").load(), memory.predict_volume(volume))
    provenance = json.loads((tmp_path / "out" / "v.tif.provenance.json").read_text())
    assert provenance["parameters"]["inference"]["upper_tail"] == "log"


def test_plane_folder_and_zarr_outputs_written_block_by_block(conv_model, tiny_model_config, tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 255, (12, 48, 40)).astype(np.uint8)
    planes = tmp_path / "planes"
    planes.mkdir()
    for z, plane in enumerate(volume):
        tifffile.imwrite(planes / f"slice_{z:03d}.tif", plane)
    expected = make_predictor(conv_model, tiny_model_config).predict_volume(volume)
    predictor = make_predictor(conv_model, tiny_model_config, block_size=(5, 30, 40), mask_value=255)
    results = predict_files(predictor, [planes], tmp_path / "out")
    assert results[0].ok, results
    out = tmp_path / "out" / "planes"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in planes.iterdir())
    np.testing.assert_array_equal(io.read_volume(out).load(), expected * 255)
    results = predict_files(predictor, [planes], tmp_path / "zarr", output_format="zarr")
    written = io.read_volume(tmp_path / "zarr" / "planes.ome.zarr")
    assert results[0].output.endswith("planes.ome.zarr") and written.fmt == "zarr"
    np.testing.assert_array_equal(written.load(), expected * 255)


def test_disk_full_mid_volume_removes_partial_output_and_continues(conv_model, tiny_model_config, tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.tif", "b.tif", "c.nii.gz"):
        io.write_volume(rng.integers(0, 999, (24, 40, 40)).astype(np.uint16), inputs / name)
    tiff = io.FORMATS["tiff"]
    real_writer = tiff.write_blocks

    def filling_disk(blocks, path, **kwargs):
        def until_full():
            for number, item in enumerate(blocks):
                if number == 2 and path.name.endswith("a.tif"):
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield item

        return real_writer(until_full(), path, **kwargs)

    monkeypatch.setattr(tiff, "write_blocks", filling_disk)
    predictor = make_predictor(conv_model, tiny_model_config, block_size=(8, 40, 40))
    results = predict_files(predictor, io.list_volumes(inputs), tmp_path / "out")
    assert [r.ok for r in results] == [False, True, True]
    assert "No space left on device" in results[0].error and str(tmp_path / "out" / "a.tif") in results[0].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "b.tif", "b.tif.provenance.json", "c.nii.gz", "c.nii.gz.provenance.json"
    ]
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]


def test_bad_plane_folders_are_reported_and_others_processed(conv_model, tiny_model_config, tmp_path, caplog):
    root = tmp_path / "in"
    mixed_shapes, mixed_types, missing = root / "mixed_shapes", root / "mixed_types", root / "missing"
    for folder in (mixed_shapes, mixed_types, missing):
        folder.mkdir(parents=True)
        for z in (0, 1, 2, 3):
            tifffile.imwrite(folder / f"z{z:04d}.tif", np.full((32, 32), 10 * z, np.uint16))
    tifffile.imwrite(mixed_shapes / "z0002.tif", np.zeros((32, 30), np.uint16))
    tifffile.imwrite(mixed_types / "z0003.tif", np.zeros((32, 32), np.float32))
    (missing / "z0002.tif").unlink()
    good = root / "good.tif"
    io.write_volume(np.random.default_rng(4).integers(0, 999, (8, 32, 32)).astype(np.uint16), good)
    predictor = make_predictor(conv_model, tiny_model_config)
    results = predict_files(predictor, [mixed_shapes, mixed_types, missing, good], tmp_path / "out")
    assert [r.ok for r in results] == [False, False, False, True]
    assert "differ in shape" in results[0].error and "mixed_shapes" in results[0].error
    assert "differ in type" in results[1].error
    assert "missing plane" in results[2].error and ": 2" in results[2].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.tif", "good.tif.provenance.json"]


def test_nan_in_a_later_block_fails_that_file_cleanly(conv_model, tiny_model_config, tmp_path):
    volume = np.random.default_rng(5).random((24, 40, 40)).astype(np.float32)
    volume[20, 5, 5] = np.nan
    io.write_volume(volume, tmp_path / "nan.tif")
    predictor = make_predictor(conv_model, tiny_model_config, block_size=(8, 40, 40))
    results = predict_files(predictor, [tmp_path / "nan.tif"], tmp_path / "out")
    assert not results[0].ok and "NaN/Inf" in results[0].error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_peak_memory_follows_block_size_not_volume_size(conv_model, tiny_model_config, tmp_path):
    """numpy allocations (regions, accumulators, slabs) traced for a volume and one 4x its size."""
    predictor = make_predictor(conv_model, tiny_model_config, block_size=(16, 64, 64), prefetch=False)
    predictor.sample_voxels = 20_000  # as a whole organ is to the default: the subsample stays small
    peaks = []
    predictor.predict_volume(np.zeros((8, 8, 8), np.float32) + np.arange(8))  # warm-up allocations
    for factor in (1, 4):
        shape = (64 * factor, 64, 128)
        path = tmp_path / f"v{factor}.tif"
        io.write_volume(np.random.default_rng(factor).integers(0, 999, shape).astype(np.uint16), path)
        tracemalloc.start()
        predict_file(predictor, path, tmp_path / "out" / path.name)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    volume_bytes = 64 * 64 * 128 * 4  # the 1x volume as float32
    assert peaks[1] < 1.3 * peaks[0], peaks
    assert peaks[1] - peaks[0] < volume_bytes, peaks  # growing 4x must not cost another volume


def test_small_components_removed_in_files_and_arrays(conv_model, tiny_model_config, tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    volume = rng.integers(100, 4000, (20, 60, 70)).astype(np.uint16)  # noise: plenty of speckle
    io.write_volume(volume, tmp_path / "noise.tif")
    logits = make_predictor(conv_model, tiny_model_config).predict_logits(volume)
    threshold = float(1 / (1 + np.exp(-np.percentile(logits, 93))))  # the brightest 7 %: speckle
    settings = InferenceSettings(overlap=0.5, threshold=threshold, min_component_voxels=15)

    def sizes_and_borders(mask, block=None):
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((mask > 0).astype(np.uint8)), True))
        touching = set()
        if block is not None:  # components on an inner block border may be kept whatever their size
            for axis, edge in enumerate(block):
                for cut in range(edge, mask.shape[axis], edge):
                    touching |= set(np.unique(np.take(labels, [cut - 1, cut], axis=axis)).tolist())
        return np.bincount(labels.ravel())[1:], touching

    options = RunOptions(progress=False)
    plain = Predictor(conv_model, tiny_model_config, InferenceSettings(overlap=0.5, threshold=threshold), device="cpu",
                      options=options)
    assert sizes_and_borders(plain.predict_volume(volume))[0].min() < 15  # there is speckle to remove
    whole = Predictor(conv_model, tiny_model_config, settings, device="cpu", options=options).predict_volume(volume)
    assert whole.any() and sizes_and_borders(whole)[0].min() >= 15
    block = (10, 30, 35)
    split = Predictor(conv_model, tiny_model_config, settings, device="cpu",
                      options=RunOptions(progress=False, block_size=block))
    record = predict_file(split, tmp_path / "noise.tif", tmp_path / "out" / "noise.tif").record
    assert record["parameters"]["inference"]["min_component_voxels"] == 15
    mask = io.read_volume(tmp_path / "out" / "noise.tif").load()
    sizes, touching = sizes_and_borders(mask, block)
    small = {i + 1 for i in np.flatnonzero(sizes < 15)}
    assert small <= touching  # every small component left is cut by a block border
    assert ((mask > 0) <= (plain.predict_volume(volume) > 0)).all()  # cleaning only removes voxels


def test_default_blocks_cut_as_little_as_the_budget_allows():
    from lsmseg.inference.blocks import DEFAULT_BLOCK_VOXELS, default_block_shape

    assert default_block_shape((32, 448, 448)) == (32, 448, 448)  # fits: one block, no re-run windows
    big = (2000, 2000, 2000)
    block = default_block_shape(big)
    assert np.prod(block) <= DEFAULT_BLOCK_VOXELS and min(block) >= 200  # a whole organ: ~256^3 blocks
    thin = default_block_shape((64, 4000, 4000))
    assert thin[0] == 64 and np.prod(thin) <= DEFAULT_BLOCK_VOXELS


def test_default_blocks_aligned_to_the_window_grid_are_straddled_by_one_row_per_cut():
    from lsmseg.inference.blocks import default_block_shape, grid_stride

    shape, stride = (1000, 2000, 2000), grid_stride(ROI, 0.5)
    assert stride == (16, 32, 32)
    unaligned, aligned = default_block_shape(shape), default_block_shape(shape, stride=stride)
    assert unaligned == (250, 250, 250) and aligned == (256, 256, 256)

    def border_rows(block):
        plan = plan_blocks(shape, ROI, 0.5, block)
        return sum(b.n_windows for b in plan.blocks) / plan.n_windows

    assert border_rows(aligned) < 0.85 * border_rows(unaligned)  # 1.30x the windows against 1.65x
    assert default_block_shape((32, 448, 448), stride=stride) == (32, 448, 448)  # one block stays one
    assert default_block_shape((70, 300, 1000), budget=100 ** 3, stride=stride)[2] % 32 == 0


@pytest.mark.parametrize("block_size", [None, (20, 50, 70)])
def test_device_accumulation_equals_host_bit_for_bit(conv_model, tiny_model_config, monkeypatch, block_size):
    """The device path (torch accumulators; forced onto the CPU here) adds the same float32 windows
    in the same order as the host's NumPy accumulators: the same bits, skipped windows included."""
    rng = np.random.default_rng(2)
    volume = rng.integers(100, 4000, (40, 100, 200)).astype(np.uint16)
    volume[:, :, :110] = rng.integers(95, 105, (40, 100, 110))  # dark: windows blended as background
    host = make_predictor(conv_model, tiny_model_config, block_size=block_size)
    device = make_predictor(conv_model, tiny_model_config, block_size=block_size)
    monkeypatch.setattr(device, "accumulation_device", lambda block: torch.device("cpu"))
    calls = []
    run_windows = device.run_windows
    monkeypatch.setattr(device, "run_windows", lambda windows, on_device=False, mirror_axes=(): calls.append(on_device)
                        or run_windows(windows, on_device, mirror_axes))
    expected, stats = host.logits_with_stats(volume)
    logits = device.logits_with_stats(volume)[0]
    assert stats.windows_skipped > 0
    # The windows' logits stay where they are blended (the first call is background_logits').
    assert len(calls) > 1 and calls == [False] + [True] * (len(calls) - 1)
    assert logits.dtype == np.float32 and logits.tobytes() == expected.tobytes()


def test_blocks_fall_back_to_host_accumulation_when_the_gpu_lacks_memory(conv_model, tiny_model_config, monkeypatch):
    from lsmseg.inference import blocks

    shape = (64, 256, 256)
    need = blocks.accumulator_bytes(shape)
    assert need == 2 * 4 * 64 * 256 * 256  # two float32 accumulators
    enough = int(need / blocks.DEVICE_MEMORY_SHARE)
    cuda = torch.device("cuda:0")  # only the decision runs: no GPU needed
    assert blocks.accumulation_device(cuda, shape, free_memory=lambda d: enough) == cuda
    assert blocks.accumulation_device(cuda, shape, free_memory=lambda d: enough - 1) is None
    assert blocks.accumulation_device(torch.device("cpu"), shape, free_memory=lambda d: 10**15) is None  # the host

    # The predictor asks torch.cuda.mem_get_info of its own device, and only where PyTorch runs the network.
    predictor = make_predictor(conv_model, tiny_model_config)
    predictor.device = cuda
    block = predictor.plan(shape).blocks[0]
    free = {"bytes": 10 * need}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    assert predictor.accumulation_device(block) == cuda
    free["bytes"] = need  # the accumulators would take all of it: blended on the host
    assert predictor.accumulation_device(block) is None
    free["bytes"] = 10 * need
    predictor.options = RunOptions(progress=False, device_accumulation=False)
    assert predictor.accumulation_device(block) is None


@pytest.mark.cuda  # scripts/gpu_check.sh runs it with tests/cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_accumulation_on_cuda_equals_host_accumulation(conv_model, tiny_model_config):
    """On a GPU: blended in device memory (pinned uploads, logits left on the GPU) vs every batch
    copied down and blended on the host. Same IEEE float32 products, adds and division in the same
    order, so equal up to the network's own call-to-call rounding (none expected)."""
    rng = np.random.default_rng(3)
    volume = rng.integers(100, 4000, (40, 100, 200)).astype(np.uint16)
    volume[:, :, :110] = rng.integers(95, 105, (40, 100, 110))
    results = {}
    for on_device in (True, False):
        predictor = Predictor(conv_model, tiny_model_config, InferenceSettings(overlap=0.5), device="cuda",
                              precision="fp32", engine="torch",
                              options=RunOptions(progress=False, block_size=(20, 50, 70), device_accumulation=on_device))
        block = predictor.plan(volume.shape, (20, 50, 70)).blocks[0]
        assert (predictor.accumulation_device(block) is not None) == on_device
        results[on_device] = predictor.logits_with_stats(volume)[0]
    np.testing.assert_allclose(results[True], results[False], rtol=0, atol=1e-6)


def test_blocks_skip_the_same_windows_as_one_pass_where_windows_are_off_the_cell_grid(conv_model,
                                                                                      tiny_model_config):
    # 169 voxels in x: the last window starts at 105, off the 4-voxel cells of a region read from 0;
    # a bright corner beside a dark one decides windows near the cells' edges.
    rng = np.random.default_rng(1)
    volume = rng.normal(1000, 30, (43, 48, 169))
    volume[7:11, 7:11, 1:5] = 3000
    volume[:, :, 100:] += rng.normal(600, 100, (43, 48, 69))
    volume = volume.astype(np.float32)
    whole = make_predictor(conv_model, tiny_model_config)
    split = make_predictor(conv_model, tiny_model_config, block_size=(18, 30, 66))
    logits_whole, stats_whole = whole.logits_with_stats(volume)
    logits_split, stats_split = split.logits_with_stats(volume)
    assert stats_whole.windows_skipped > 0
    assert stats_split.skipped == stats_whole.skipped
    np.testing.assert_allclose(logits_split, logits_whole, atol=1e-5)  # batches differ: 3e-7 (above)
