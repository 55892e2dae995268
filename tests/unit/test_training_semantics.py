"""Training teaches what inference asks: a patch equals inference's input on the same voxels, labels
stay on the image's grid through resampling and augmentation, unlabelled voxels stay unlabelled."""

import numpy as np
import pytest
import torch
from lsmseg_training.config import AugmentConfig, DataConfig, VolumeSet
from lsmseg_training.data import (
    IGNORE,
    VolumeCache,
    build_augmentation,
    prepare_volumes,
    read_patch,
)
from lsmseg_training.losses import dice_bce, soft_cldice, split_label

from lsmseg import io
from lsmseg.inference.predictor import _resize, resampled_shape
from lsmseg.normalise import normalise, percentiles

STILL = {"flip_prob": 0.0, "rotate90_prob": 0.0, "rotate_prob": 0.0, "zoom_prob": 0.0, "gamma_prob": 0.0,
         "scale_prob": 0.0, "shift_prob": 0.0, "noise_prob": 0.0}


def _write(folder, image, label, spacing=(4.0, 1.0, 1.0)):
    io.write_volume(image, folder / "images" / "v.tif", spacing=spacing)
    io.write_volume(label, folder / "labels" / "v.tif", spacing=spacing)


@pytest.mark.parametrize("tail", ["clip", "log"])
@pytest.mark.parametrize("target, downscale", [((2.0, 1.5, 1.5), 1.0), (None, 1 / 3), ((3.0, 0.7, 0.7), 1.0)],
                         ids=["coarser", "downscale", "finer"])
def test_resampled_patch_equals_inference_input(tmp_path, tail, target, downscale):
    """A patch of a resampled set is the crop of what inference feeds the network: the whole volume
    normalised, then resized to the model's spacing (Predictor.logits_from_normalised)."""
    shape = (30, 97, 101)
    image = np.random.default_rng(0).gamma(2.0, 300, size=shape).astype(np.uint16)
    label = (image > np.percentile(image, 90)).astype(np.uint8)
    _write(tmp_path, image, label)
    data = DataConfig(train=[VolumeSet(images=tmp_path / "images", labels=tmp_path / "labels")],
                      target_spacing=target, downscale=downscale, upper_tail=tail)
    record = prepare_volumes(data, "train", need_labels=True, where="cfg")[0]
    spacing = np.array(record.spacing)
    grid_shape = resampled_shape(shape, spacing, spacing * np.array(record.factors))
    assert tuple(grid_shape) == record.grid
    expected = _resize(normalise(image, *percentiles(image), tail), grid_shape)
    expected_label = _resize(label.astype(np.float32), grid_shape) >= 0.5
    rng = np.random.default_rng(1)
    roi = [min(16, g) for g in record.grid]
    for _ in range(10):
        corner = [int(rng.integers(0, g - r + 1)) for g, r in zip(record.grid, roi)]
        patch, patch_label = read_patch(record, VolumeCache(256), corner, roi, rng)
        crop = tuple(slice(c, c + r) for c, r in zip(corner, roi))
        assert patch.dtype == np.float32
        np.testing.assert_allclose(patch, expected[crop], atol=1e-4)
        assert np.array_equal(patch_label, expected_label[crop])


@pytest.mark.parametrize("downscale", [1 / 3, 0.5, 1 / 1.5])
def test_sparse_labels_resample_on_the_image_grid_and_stay_unlabelled(tmp_path, downscale):
    """A sparse set on a resampled grid: labels picked at the image's sample positions, 0 stays IGNORE."""
    shape = (6, 20, 120)
    x = np.broadcast_to(np.arange(shape[2]), shape)
    image = (1000 + 10 * x).astype(np.uint16)  # the image encodes the native x it was sampled at
    label = np.where(x >= 60, 2, 1).astype(np.uint8)
    label[:, :, 30:40] = 0  # unlabelled band
    _write(tmp_path, image, label, spacing=(1.0, 1.0, 1.0))
    data = DataConfig(train=[VolumeSet(images=tmp_path / "images", labels=tmp_path / "labels", label_mode="sparse")],
                      downscale=downscale, lower_percentile=0, upper_percentile=100)
    record = prepare_volumes(data, "train", need_labels=True, where="cfg")[0]
    patch, patch_label = read_patch(record, VolumeCache(256), (0, 0, 0), record.grid, np.random.default_rng(0))
    native_x = patch[0, 0] * (record.hi - record.lo) / 10
    row = patch_label[0, 0]
    nearest = np.rint(native_x)
    assert set(np.unique(patch_label)) == {0, 1, IGNORE}
    assert np.array_equal(row == IGNORE, (nearest >= 30) & (nearest < 40))
    assert np.array_equal(row == 1, nearest >= 60)


def _augment(extra, seed, image, label, **options):
    transform = build_augmentation(AugmentConfig(**{**STILL, **extra}), seed, image.shape)
    out = transform({"image": torch.from_numpy(image[None].copy()), "label": torch.from_numpy(label[None].copy())},
                    **options)
    return np.asarray(out["image"])[0], np.asarray(out["label"])[0]


@pytest.mark.parametrize("extra", [{"zoom_prob": 1.0}, {"rotate_prob": 1.0}], ids=["zoom", "rotate"])
def test_spatial_augmentation_keeps_the_label_on_the_image(extra):
    """A coordinate ramp given as image (linear) and as label (nearest) must come out at the same
    coordinates: a label shifted against its image teaches a shifted boundary."""
    roi = (16, 32, 32)
    ramp = np.broadcast_to(np.arange(1, roi[2] + 1, dtype=np.float32)[None, None], roi).copy()
    shifts = []
    for seed in range(20):
        image, label = _augment(extra, seed, ramp, ramp)
        inner = (slice(3, -3), slice(6, -6), slice(6, -6))  # away from what was filled in
        shifts.append(float((label - image)[inner].mean()))
        assert np.abs(label - image)[inner].max() <= 0.5 + 1e-4
    assert abs(np.mean(shifts)) < 0.05


@pytest.mark.parametrize("extra", [{"zoom_prob": 1.0, "zoom_range": (0.8, 0.85)}, {"rotate_prob": 1.0}],
                         ids=["zoom out", "rotate"])
def test_augmentation_fills_unlabelled_voxels_of_sparse_patches_with_ignore(extra):
    """What rotation and zoom move in is no data: IGNORE in a sparse patch, background in a dense one
    (as read_patch pads), never background where the patch had no label."""
    roi = (16, 32, 32)
    image = np.ones(roi, np.float32)
    filled = 0
    for seed in range(10):
        filled_image, sparse = _augment(extra, seed, image, np.full(roi, IGNORE, np.float32), pad_label=IGNORE)
        assert (sparse == IGNORE).all()
        _, dense = _augment(extra, seed, image, np.ones(roi, np.float32))
        assert set(np.unique(dense)) <= {0.0, 1.0}
        # background only where the image was filled in (edges blend linearly in the image)
        assert (filled_image[dense == 0] < 1).all() and (dense[filled_image == 0] == 0).all()
        filled += int((dense == 0).sum())
    assert filled > 0  # something was moved in


def test_intensity_augmentation_leaves_labels_alone():
    roi = (8, 16, 16)
    image = np.random.default_rng(0).random(roi).astype(np.float32)
    label = (image > 0.5).astype(np.float32)
    label[:2] = IGNORE
    intensity = {"gamma_prob": 1.0, "scale_prob": 1.0, "shift_prob": 1.0, "noise_prob": 1.0}
    for seed in range(5):
        out_image, out_label = _augment(intensity, seed, image, label)
        assert np.array_equal(out_label, label) and not np.allclose(out_image, image)


def test_ignored_voxels_get_no_gradient_and_an_unlabelled_patch_a_finite_loss():
    generator = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 8, 16, 16, generator=generator) > 0.8).float()
    label[..., :8] = IGNORE
    logits = torch.randn(2, 1, 8, 16, 16, generator=generator, requires_grad=True)
    for loss in (lambda t, v: dice_bce(logits, t, v), lambda t, v: soft_cldice(logits, t, v, 3)):
        logits.grad = None
        loss(*split_label(label)).backward()
        assert float(logits.grad[label == IGNORE].abs().max()) == 0.0
        assert float(logits.grad[label != IGNORE].abs().max()) > 0.0
        logits.grad = None
        value = loss(*split_label(torch.full_like(label, IGNORE)))
        value.backward()
        assert torch.isfinite(value) and value.item() == 0.0 and float(logits.grad.abs().max()) == 0.0


@pytest.mark.parametrize("spacing, resampled", [((4.0, 1.1, 1.1), False), ((4.0, 1.3, 0.9), True),
                                                ((5.0, 1.0, 1.0), False), ((6.0, 1.0, 1.0), True)])
def test_a_set_within_inferences_spacing_tolerance_is_trained_on_its_native_grid(tmp_path, spacing, resampled):
    # Was resampled for any difference, where inference (InferenceSettings.spacing_tolerance, 25 %)
    # leaves such a volume as it is: the model learned it rescaled.
    from lsmseg.config import InferenceSettings

    shape = (12, 40, 44)
    label = np.zeros(shape, np.uint8)
    label[6, 20, 22] = 1
    _write(tmp_path, np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), label, spacing=spacing)
    data = DataConfig(train=[VolumeSet(images=tmp_path / "images", labels=tmp_path / "labels")],
                      target_spacing=(4.0, 1.0, 1.0))
    record = prepare_volumes(data, "train", need_labels=True, where="cfg")[0]
    within = all(abs(s / t - 1.0) <= InferenceSettings.spacing_tolerance for s, t in zip(spacing, (4.0, 1.0, 1.0)))
    assert within is not resampled  # the cases sit on both sides of the tolerance
    assert (record.grid != shape) is resampled and (record.factors != (1.0, 1.0, 1.0)) is resampled
