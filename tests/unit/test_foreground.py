"""Background skipping: which windows are dark, and the prior it makes, tested against the truth."""

from pathlib import Path

import numpy as np
import pytest

from lsmseg import io
from lsmseg.inference.foreground import estimate_background, dark_windows
from lsmseg.inference import Predictor, RunOptions

SAMPLE = Path(__file__).resolve().parents[2] / "sample"


def test_only_windows_that_miss_the_tissue_are_dark():
    rng = np.random.default_rng(0)
    region = rng.normal(0.04, 0.01, (32, 128, 128)).astype(np.float32)  # dark, noisy
    region[8:20, 70:90, 70:90] = 0.5  # tissue
    background = estimate_background(region)
    assert background is not None and background.threshold < 0.5 and abs(background.level - 0.04) < 0.01
    corners = [(0, y, x) for y in (0, 32, 64) for x in (0, 32, 64)]
    flags = dark_windows(region, (0, 0, 0), corners, (32, 64, 64), background)
    touches = [not (y + 64 <= 70 or y >= 90 or x + 64 <= 70 or x >= 90) for _, y, x in corners]
    assert flags == [not t for t in touches]


def test_no_dark_background_means_no_skipping():
    tissue = np.random.default_rng(1).normal(0.5, 0.05, (16, 64, 64)).astype(np.float32)
    background = estimate_background(tissue)
    assert background is None or not any(dark_windows(tissue, (0, 0, 0), [(0, 0, 0)], (16, 64, 64), background))


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.slow  # the shipped Swin UNETR on 64 windows, twice: about a minute on two CPU cores
def test_skipping_is_a_prior_that_holds_on_a_dark_field_with_the_shipped_network():
    """Skipping assumes uniformly dark windows hold nothing. With the real network, against the truth:
    it removes the false structures the network answers dark noise with, and loses no true voxel."""
    image = io.read_volume(SAMPLE / "images" / "vessels_0.tif").load()
    label = io.read_volume(SAMPLE / "labels" / "vessels_0.tif").load() > 0
    # The sample beside a field of its own background (its darkest voxels, resampled), as in a
    # whole-organ scan whose field of view is wider than the organ: whole windows are dark.
    dark = np.sort(image, axis=None)[: image.size // 4]
    wide = np.random.default_rng(0).choice(dark, (*image.shape[:2], image.shape[2] + 128)).astype(image.dtype)
    wide[..., :image.shape[2]] = image
    truth = np.zeros(wide.shape, bool)
    truth[..., :image.shape[2]] = label
    field = np.zeros(wide.shape, bool)
    field[..., image.shape[2]:] = True
    masks, stats = {}, {}
    for skip in (False, True):
        predictor = Predictor.from_manifest(SAMPLE.parent / "weights", device="cpu",
                                            options=RunOptions(progress=False, skip_background=skip))
        logits, stats[skip] = predictor.logits_with_stats(wide)
        masks[skip] = predictor.binary_mask(logits, settings=predictor.settings_for("vessels_0")) > 0
    assert stats[False].windows_skipped == 0 and stats[True].windows_skipped >= 0.25 * stats[True].windows
    recall = {skip: (masks[skip] & truth).sum() / truth.sum() for skip in masks}
    false_in_field = {skip: int((masks[skip] & field).sum()) for skip in masks}
    assert recall[True] >= recall[False] - 0.001, recall  # no true structure lost
    assert false_in_field[False] > 1000, false_in_field  # the network does see structure in dark noise
    assert false_in_field[True] <= 0.25 * false_in_field[False], false_in_field
    assert _dice(masks[True], truth) > _dice(masks[False], truth)


def test_numpy_otsu_matches_scikit_image():
    from skimage.filters import threshold_otsu

    from lsmseg.inference.foreground import otsu_threshold

    rng = np.random.default_rng(7)
    for values in (
        np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.1, 2000)]),
        rng.gamma(2.0, 0.1, 10000),
    ):
        assert abs(otsu_threshold(values) - threshold_otsu(values)) < 1e-9


def test_noise_tail_is_tolerated_but_a_small_bright_object_is_not():
    rng = np.random.default_rng(4)
    region = rng.normal(0.05, 0.01, (32, 128, 256)).astype(np.float32)
    region[:, :, 192:] = rng.normal(0.5, 0.05, (32, 128, 64))  # tissue: sets Otsu's split near 0.27
    background = estimate_background(region)
    assert background.threshold < 0.12 < background.ceiling < 0.5
    cells = [(z, y, x) for z in range(0, 32, 4) for y in range(0, 128, 4) for x in range(0, 128, 4)]
    for i in rng.choice(len(cells), 20, replace=False):  # 20 of 8192 dark cells in the noise tail
        z, y, x = cells[i]
        region[z:z + 4, y:y + 4, x:x + 4] = 0.12
    corners = [(0, y, x) for y in (0, 64) for x in (0, 64)]
    assert dark_windows(region, (0, 0, 0), corners, (32, 64, 64), background) == [True] * 4
    region[10:14, 20:24, 20:24] = 0.6  # one bright 4^3 object in the first window
    assert dark_windows(region, (0, 0, 0), corners, (32, 64, 64), background) == [False, True, True, True]


def test_a_window_is_judged_on_its_own_voxels_whichever_region_holds_it():
    # Blocks read regions starting at different windows, so a window lies at another offset in
    # each; a window not on the 4-voxel cell grid of one region (the last, flush one of an axis)
    # must not take in voxels beyond its faces there, or one block skips it and the next runs it.
    rng = np.random.default_rng(5)
    region = rng.normal(0.05, 0.01, (32, 64, 128)).astype(np.float32)
    region[:, :, 96:] = rng.normal(0.5, 0.05, (32, 64, 32))  # tissue
    region[:, :, :3] = 0.5  # bright, just before the window at x = 3
    background = estimate_background(region)
    window = [(0, 0, 3)]
    assert dark_windows(region, (0, 0, 0), window, (32, 64, 64), background) == [True]
    assert dark_windows(region[:, :, 3:], (0, 0, 3), window, (32, 64, 64), background) == [True]
