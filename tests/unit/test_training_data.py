"""The patch stream: checks before training, lazy reads, padding, resampling, balance, seeds."""

import numpy as np
import pytest

from lsmseg import io
from lsmseg.errors import ConfigError, InputError
from lsmseg_training.config import AugmentConfig, DataConfig, MaskingConfig, VolumeSet
import lsmseg_training.data as training_data
from lsmseg_training.data import PatchStream, VolumeCache, cuboid_mask, prepare_volumes, read_patch

ROI = (32, 64, 64)


def _volume_pair(folder, name, shape=(20, 80, 90), label_value=1, seed=0, spacing=(4.0, 1.0, 1.0)):
    rng = np.random.default_rng(seed)
    image = rng.integers(100, 200, size=shape, dtype=np.uint16)
    label = np.zeros(shape, np.uint8)
    label[shape[0] // 2, 10:14, 20:24] = label_value  # one small foreground blob
    image[label > 0] += 1000
    io.write_volume(image, folder / "images" / f"{name}.tif", spacing=spacing)
    io.write_volume(label, folder / "labels" / f"{name}.tif", spacing=spacing)
    return image, label


@pytest.fixture
def data_dir(tmp_path):
    _volume_pair(tmp_path, "a")
    _volume_pair(tmp_path, "b", shape=(40, 70, 70), seed=1)
    return tmp_path


def _data(folder, **set_options):
    return DataConfig(train=[VolumeSet(images=folder / "images", labels=folder / "labels", **set_options)])


def test_records_hold_percentiles_and_foreground(data_dir):
    records = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
    assert [r.name for r in records] == ["a", "b"]
    a = records[0]
    assert a.shape == (20, 80, 90) and a.grid == (20, 80, 90) and a.spacing == (4.0, 1.0, 1.0)
    assert 100 <= a.lo < a.hi
    assert len(a.foreground) == 16 and set(a.foreground[:, 0]) == {10}


def test_missing_data_path_names_the_config_key(tmp_path):
    data = DataConfig(train=[VolumeSet(images=tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match=r"cfg: data\.train\[0\]\.images: .*nowhere: no such file"):
        prepare_volumes(data, "train", need_labels=False, where="cfg")


def test_include_typo_is_refused(data_dir):
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.exclude: no volume named 'c'"):
        prepare_volumes(_data(data_dir, exclude=["c"]), "train", need_labels=True, where="cfg")


def test_tune_and_packing_select_volumes_by_the_same_checked_rule(data_dir):
    # set_volumes (tune's validation list, the GPU packer) kept a selection rule of its own that
    # skipped the checks: an include typo silently dropped the volume from tuning.
    from lsmseg_training.data import set_volumes

    volume_set = VolumeSet(images=data_dir / "images", labels=data_dir / "labels", include=["a"])
    assert set_volumes(volume_set) == [("a", data_dir / "images" / "a.tif", data_dir / "labels" / "a.tif")]
    with pytest.raises(ConfigError, match=r"cfg: data\.validation\[1\]\.include: no volume named 'c'"):
        set_volumes(VolumeSet(images=data_dir / "images", include=["a", "c"]), "data.validation[1]", "cfg")


def test_label_shape_mismatch_names_the_label(data_dir):
    io.write_volume(np.zeros((20, 80, 91), np.uint8), data_dir / "labels" / "a.tif")
    with pytest.raises(InputError, match=r"labels/a\.tif: label shape \(20, 80, 91\) differs from its image"):
        prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")


def test_missing_label_is_refused(data_dir):
    (data_dir / "labels" / "b.tif").unlink()
    with pytest.raises(InputError, match=r"labels/b\.tif: no label for image"):
        prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")


@pytest.mark.parametrize("value", [2, 254])
def test_non_binary_label_values_are_refused(data_dir, value):
    _volume_pair(data_dir, "a", label_value=value)
    with pytest.raises(InputError, match=rf"labels/a\.tif: label values \{{0, {value}\}} are not binary"):
        prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")


def test_nonzero_option_accepts_other_foreground_values(data_dir):
    _volume_pair(data_dir, "a", label_value=254)
    records = prepare_volumes(_data(data_dir, label_values="nonzero"), "train", need_labels=True, where="cfg")
    assert len(records[0].foreground) == 16


def test_0_255_labels_are_accepted(data_dir):
    _volume_pair(data_dir, "a", label_value=255)
    records = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
    image, label = read_patch(records[0], VolumeCache(0), (0, 0, 0), ROI, np.random.default_rng(0))
    assert set(np.unique(label)) <= {0.0, 1.0}


def test_patch_reads_lazily_and_pads_short_axes(data_dir):
    record = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")[0]
    cache = VolumeCache(cache_mb=0)  # nothing held in memory: lazy reader
    image, label = read_patch(record, cache, (0, 5, 7), ROI, np.random.default_rng(0))
    assert image.shape == ROI and label.shape == ROI and image.dtype == np.float32
    assert not isinstance(cache.get(record.image, record.nbytes), np.ndarray)
    # z has 20 planes in a 32-plane window: 12 planes of zero padding, placed at random
    z_has_data = np.abs(image).reshape(32, -1).max(axis=1) > 0
    assert z_has_data.sum() == 20
    # the patch equals the normalised source region
    source = io.read_volume(record.image).load()[:, 5:69, 7:71]
    expected = np.clip((source - record.lo) / (record.hi - record.lo), 0, 1)
    first = int(np.argmax(z_has_data))
    np.testing.assert_allclose(image[first : first + 20], expected, atol=1e-5)


def test_patch_follows_the_upper_tail_setting(data_dir):
    data = _data(data_dir)
    data.upper_tail = "log"
    record = prepare_volumes(data, "train", need_labels=True, where="cfg")[0]
    assert record.upper_tail == "log"
    image, _ = read_patch(record, VolumeCache(0), (0, 0, 0), ROI, np.random.default_rng(0))
    scaled = (io.read_volume(record.image).load() - record.lo) / (record.hi - record.lo)
    assert image.max() == pytest.approx(1 + np.log(scaled[:, :64, :64].max()), rel=1e-4) and image.max() > 1


def test_target_spacing_resamples_the_grid(data_dir):
    data = _data(data_dir)
    data.target_spacing = (2.0, 2.0, 2.0)
    record = prepare_volumes(data, "train", need_labels=True, where="cfg")[0]
    assert record.factors == (0.5, 2.0, 2.0) and record.grid == (40, 40, 45)
    image, label = read_patch(record, VolumeCache(0), (0, 0, 0), ROI, np.random.default_rng(0))
    assert image.shape == ROI and label.sum() > 0


def test_target_spacing_needs_a_known_spacing(tmp_path):
    _volume_pair(tmp_path, "a", spacing=None)
    data = _data(tmp_path)
    data.target_spacing = (2.0, 2.0, 2.0)
    with pytest.raises(InputError, match="voxel spacing unknown"):
        prepare_volumes(data, "train", need_labels=True, where="cfg")


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_foreground_ratio_and_seeds(data_dir):
    records = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
    always = PatchStream(records, ROI, seed=3, set_weights=[1.0], foreground_ratio=1.0, labels=True)
    assert all(s["label"].sum() > 0 for s in _take(always, 6))
    never = PatchStream(records, ROI, seed=3, set_weights=[1.0], foreground_ratio=0.0, labels=True)
    # The blobs are 16 voxels of ~1.2 million: random windows rarely hit them.
    assert sum(int(s["label"].sum() > 0) for s in _take(never, 6)) < 6
    again = PatchStream(records, ROI, seed=3, set_weights=[1.0], foreground_ratio=1.0, labels=True,
                        augment=AugmentConfig())
    first, second = _take(again, 3), _take(again, 3)
    for x, y in zip(first, second):  # same seed: same patches and augmentations
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    other = PatchStream(records, ROI, seed=4, set_weights=[1.0], foreground_ratio=1.0, labels=True)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(_take(other, 3), first))


@pytest.mark.parametrize("roi", [ROI, (32, 64, 96)], ids=["square", "non-square"])
def test_augmented_patches_keep_shape_and_binary_labels(data_dir, roi):
    records = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
    augment = AugmentConfig(rotate_prob=1.0, rotate90_prob=1.0, flip_prob=1.0, noise_prob=1.0)
    stream = PatchStream(records, roi, seed=0, set_weights=[1.0], foreground_ratio=1.0, labels=True, augment=augment)
    for sample in _take(stream, 4):
        assert sample["image"].shape == (1, *roi) and sample["label"].shape == (1, *roi)
        assert set(np.unique(sample["label"].numpy())) <= {0.0, 1.0}


def test_gamma_augmentation_keeps_order_mean_and_spread():
    """Gamma changes contrast only: voxel order, mean and spread kept; off by default; bad range refused."""
    import torch

    from lsmseg_training.data import build_augmentation

    still = dict(flip_prob=0.0, rotate90_prob=0.0, rotate_prob=0.0, scale_prob=0.0, shift_prob=0.0, noise_prob=0.0)
    image = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=(1, 8, 16, 16)).astype(np.float32))
    label = torch.zeros_like(image)
    off = build_augmentation(AugmentConfig(**still), seed=0, roi=(8, 16, 16))
    assert torch.equal(off({"image": image.clone(), "label": label})["image"].as_tensor(), image)
    on = build_augmentation(AugmentConfig(**still, gamma_prob=1.0, gamma_range=(1.4, 1.5)), seed=0, roi=(8, 16, 16))
    out = torch.as_tensor(on({"image": image.clone(), "label": label})["image"])
    assert not torch.allclose(out, image, atol=1e-3)
    in_order = out.flatten()[torch.argsort(image.flatten())]
    assert bool((in_order.diff() >= -1e-6).all())  # monotone: brighter stays brighter
    assert abs(float(out.mean() - image.mean())) < 1e-3 and abs(float(out.std() - image.std())) < 1e-3
    with pytest.raises(ValueError, match="gamma_range"):
        AugmentConfig(gamma_range=(0.0, 1.5))


def test_cuboid_mask_respects_its_settings():
    config = MaskingConfig(count=(3, 8), size=(0.1, 0.3), max_fraction=0.4)
    rng = np.random.default_rng(0)
    fractions = [cuboid_mask(ROI, config, rng).mean() for _ in range(50)]
    assert min(fractions) > 0
    # one cuboid can overshoot the cap by at most its own size (0.3^3 of the patch)
    assert max(fractions) <= 0.4 + 0.3**3


@pytest.mark.parametrize("suffix", ["nii.gz", "zarr", "planes"])
def test_patches_from_every_container_format(tmp_path, suffix):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, size=(12, 70, 66), dtype=np.uint16)
    label = (image > 900).astype(np.uint8)
    name = "vol" if suffix == "planes" else f"vol.{suffix}"
    io.write_volume(image, tmp_path / "images" / name, spacing=(2.0, 1.0, 1.0))
    io.write_volume(label, tmp_path / "labels" / name, spacing=(2.0, 1.0, 1.0))
    records = prepare_volumes(_data(tmp_path), "train", need_labels=True, where="cfg")
    assert [r.name for r in records] == ["vol"] and records[0].shape == (12, 70, 66)
    patch, patch_label = read_patch(records[0], VolumeCache(0), (0, 3, 1), ROI, np.random.default_rng(0))
    z = np.flatnonzero(np.abs(patch).reshape(32, -1).max(axis=1) > 0)
    expected = (image[:, 3:67, 1:65] > 900).astype(np.float32)
    np.testing.assert_array_equal(patch_label[z[0] : z[0] + 12], expected)


# --------------------------------------------------------------------------------------------
# Bad data refused before training (one line naming the file or the config key)


def test_source_pattern_must_match_every_volume(data_dir):
    # A pattern that matched no name made each volume its own source: the split check passed silently.
    from lsmseg_training.data import check_splits

    data = _data(data_dir, source=r"^scan(\d+)_")
    with pytest.raises(ConfigError, match=r"cfg: data\.train\[0\]\.source: '\^scan\(\\d\+\)_' does not match volume 'a'"):
        check_splits(data, "cfg")
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.source: .* does not match volume 'a'"):
        prepare_volumes(data, "train", need_labels=True, where="cfg")


def test_empty_images_folder_is_refused_naming_it(data_dir, tmp_path_factory):
    # An empty folder beside a full one was silently skipped (alone: "data.train selects no volumes").
    from lsmseg_training.data import check_splits

    empty = tmp_path_factory.mktemp("empty")
    data = DataConfig(train=[VolumeSet(images=empty), VolumeSet(images=data_dir / "images")])
    with pytest.raises(ConfigError, match=rf"cfg: data\.train\[0\]\.images: {empty}: no volumes in this folder"):
        prepare_volumes(data, "train", need_labels=False, where="cfg")
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.images: .*: no volumes in this folder"):
        check_splits(data, "cfg")


def test_a_set_that_selects_nothing_is_refused(data_dir):
    data = DataConfig(train=[VolumeSet(images=data_dir / "images", exclude=["a", "b"]),
                             VolumeSet(images=data_dir / "images")])
    with pytest.raises(ConfigError, match=r"cfg: data\.train\[0\]: include/exclude leave no volume of"):
        prepare_volumes(data, "train", need_labels=False, where="cfg")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image_is_refused(data_dir, bad, monkeypatch):
    # NaN reached the patches: pretraining stopped with "loss became nan ...; lower optim.lr" (a
    # traceback blaming the learning rate); inference refuses such a volume, so training does too.
    image = np.random.default_rng(0).random((20, 80, 90)).astype(np.float32)
    image[3, 4, 5] = bad
    io.write_volume(image, data_dir / "images" / "a.tif")
    with pytest.raises(InputError, match=r"images/a\.tif: volume contains 1 NaN/Inf voxel\(s\) \(first at z 3\)"):
        prepare_volumes(_data(data_dir), "train", need_labels=False, where="cfg")
    # Counted over the whole volume, not up to the first chunk that holds one (a few planes a chunk).
    image[19] = bad
    io.write_volume(image, data_dir / "images" / "a.tif")
    monkeypatch.setattr(training_data, "SCAN_VOXELS", 80 * 90 * 4)
    with pytest.raises(InputError, match=r"volume contains 7201 NaN/Inf voxel\(s\) \(first at z 3\)"):
        prepare_volumes(_data(data_dir), "train", need_labels=False, where="cfg")


def test_empty_labels_warn_but_no_foreground_anywhere_is_refused(data_dir, caplog):
    # One empty dense label is a background-only example (real sets have them): kept, with a warning.
    io.write_mask(np.zeros((20, 80, 90), np.uint8), data_dir / "labels" / "a.tif")
    records = prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
    assert records[0].foreground_fraction == 0 and "a.tif: label has no foreground voxels" in caplog.text
    # Every training label empty: nothing to learn, most likely the wrong labels folder.
    io.write_mask(np.zeros((40, 70, 70), np.uint8), data_dir / "labels" / "b.tif")
    with pytest.raises(ConfigError, match=r"cfg: data\.train: no label has a foreground voxel"):
        prepare_volumes(_data(data_dir), "train", need_labels=True, where="cfg")
