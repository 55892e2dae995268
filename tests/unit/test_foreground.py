"""Background skipping: which windows are dark, and that skipping them keeps the Dice."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lsmseg import io
from lsmseg.config import InferenceSettings
from lsmseg.foreground import estimate_background, dark_windows
from lsmseg.predictor import Predictor

SAMPLE = Path(__file__).resolve().parents[2] / "sample"


@pytest.fixture(scope="module")
def conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 3, padding=1)
    ).eval()


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


@pytest.mark.parametrize("name", ["vessels_0", "cells_0", "nuclei_0"])
def test_skipping_keeps_dice_on_the_bundled_samples(conv_model, tiny_model_config, name):
    image = io.read_volume(SAMPLE / "images" / f"{name}.tif").load()
    label = io.read_volume(SAMPLE / "labels" / f"{name}.tif").load() > 0
    # The sample in a wider field of view, as whole-organ scans are: the margin is the sample's own
    # dark background (its darkest voxels, resampled), so that whole windows are dark.
    dark = np.sort(image, axis=None)[: image.size // 4]
    rng = np.random.default_rng(0)
    wide = rng.choice(dark, (image.shape[0], image.shape[1] + 128, image.shape[2] + 128)).astype(image.dtype)
    wide[:, 64:-64, 64:-64] = image
    wide_label = np.zeros(wide.shape, bool)
    wide_label[:, 64:-64, 64:-64] = label
    for volume, truth in ((image, label), (wide, wide_label)):
        logits = {}
        for skip in (False, True):
            predictor = Predictor(conv_model, tiny_model_config, InferenceSettings(), device="cpu", progress=False,
                                  skip_background=skip)
            logits[skip] = predictor.predict_logits(volume)
            stats = predictor.last_stats
        # An untrained stand-in: threshold where it marks as many voxels as the label has.
        threshold = np.quantile(logits[False], 1.0 - truth.mean())
        dice_off, dice_on = (_dice(logits[s] >= threshold, truth) for s in (False, True))
        assert abs(dice_on - dice_off) <= 0.002, (dice_on, dice_off)
        if volume is wide:
            assert stats["windows_skipped"] >= 0.3 * stats["windows"], stats


def test_numpy_otsu_matches_scikit_image():
    from skimage.filters import threshold_otsu

    from lsmseg.foreground import otsu_threshold

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
