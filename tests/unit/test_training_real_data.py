"""Training on real data: splits by source, sparse labels, masked losses, whole-model init."""

import numpy as np
import pytest
import torch

from lsmseg import io
from lsmseg.errors import ConfigError, InputError, WeightsError
from lsmseg_training.config import DataConfig, FinetuneConfig, VolumeSet
from lsmseg_training.data import IGNORE, VolumeCache, check_splits, prepare_volumes, read_patch
from lsmseg_training.losses import dice_bce, soft_cldice, split_label

ROI = (32, 64, 64)


def _patches(folder, names, shape=(20, 40, 40)):
    rng = np.random.default_rng(0)
    for name in names:
        io.write_volume(rng.integers(0, 100, shape, dtype=np.uint16), folder / "images" / f"{name}.tif")
        label = np.zeros(shape, np.uint8)
        label[10, 5:9, 5:9] = 1
        io.write_volume(label, folder / "labels" / f"{name}.tif")


def _set(folder, include, **options):
    return VolumeSet(images=folder / "images", labels=folder / "labels", include=include,
                     source=r"^patchvolume_(\d+)_", **options)


def test_a_source_in_two_splits_is_refused_naming_it(tmp_path):
    _patches(tmp_path, ["patchvolume_1008_0", "patchvolume_1008_1", "patchvolume_695_0"])
    data = DataConfig(train=[_set(tmp_path, ["patchvolume_1008_0"])],
                      validation=[_set(tmp_path, ["patchvolume_1008_1"])],
                      test=[_set(tmp_path, ["patchvolume_695_0"])])
    with pytest.raises(ConfigError, match=r"cfg: source '1008' .* in both data\.train and data\.validation"):
        check_splits(data, "cfg")


def test_disjoint_sources_are_recorded_per_split(tmp_path):
    _patches(tmp_path, ["patchvolume_1008_0", "patchvolume_1008_1", "patchvolume_695_0"])
    data = DataConfig(train=[_set(tmp_path, ["patchvolume_1008_0", "patchvolume_1008_1"])],
                      test=[_set(tmp_path, ["patchvolume_695_0"])])
    splits = check_splits(data, "cfg")
    assert splits["train"] == {"images:1008": ["patchvolume_1008_0", "patchvolume_1008_1"]}
    assert splits["test"] == {"images:695": ["patchvolume_695_0"]} and splits["validation"] == {}


def test_without_a_source_pattern_each_volume_is_its_own_source(tmp_path):
    _patches(tmp_path, ["a_1", "a_2"])
    plain = dict(images=tmp_path / "images", labels=tmp_path / "labels")
    data = DataConfig(train=[VolumeSet(**plain, include=["a_1"])], validation=[VolumeSet(**plain, include=["a_2"])])
    assert check_splits(data, "cfg")["validation"] == {"images:a_2": ["a_2"]}


def _sparse(folder):
    shape = (40, 64, 64)
    image = np.random.default_rng(1).integers(0, 100, shape, dtype=np.uint16)
    label = np.zeros(shape, np.uint8)  # 0 = unlabelled
    label[20] = 1  # one labelled plane: background ...
    label[20, 30:34, 30:34] = 2  # ... with an axon
    label[20, 10, 10:14] = 4  # edge: unlabelled
    io.write_volume(image, folder / "volume.tif")
    io.write_volume(label, folder / "sparse_label.tif")
    return VolumeSet(images=folder / "volume.tif", labels=folder / "sparse_label.tif")


def test_a_sparse_label_without_the_sparse_mode_is_refused(tmp_path):
    volume_set = _sparse(tmp_path)
    with pytest.raises(InputError, match=r"sparse_label\.tif: label values \{0, 1, 2, 4\} .* label_mode: sparse"):
        prepare_volumes(DataConfig(train=[volume_set]), "train", need_labels=True, where="cfg")


def test_sparse_patches_code_unlabelled_voxels_and_centre_on_labels(tmp_path):
    volume_set = _sparse(tmp_path)
    volume_set.label_mode = "sparse"
    (record,) = prepare_volumes(DataConfig(train=[volume_set]), "train", need_labels=True, where="cfg")
    assert record.sparse and set(record.foreground[:, 0]) == {20}  # labelled positions only
    assert record.foreground_fraction == pytest.approx(16 / (64 * 64 - 4))  # axon share of labelled voxels
    rng = np.random.default_rng(0)
    _, label = read_patch(record, VolumeCache(64), (4, 0, 0), ROI, rng)
    assert set(np.unique(label)) == {0, 1, IGNORE}
    assert (label[16] != IGNORE).sum() == 64 * 64 - 4 and (label[15] == IGNORE).all()  # plane 20 - corner 4
    assert (label[16, 10, 10:14] == IGNORE).all() and (label[16, 30:34, 30:34] == 1).all()


def test_sparse_sets_are_for_training_only(tmp_path):
    with pytest.raises(ValueError, match="sparse labels are for training only"):
        FinetuneConfig(name="x", output=tmp_path, data=DataConfig(
            train=[VolumeSet(images=tmp_path)], validation=[VolumeSet(images=tmp_path, label_mode="sparse")]))


def test_unknown_structure_is_refused(tmp_path):
    with pytest.raises(ValueError, match="structure 'vesels' is not one of"):
        VolumeSet(images=tmp_path, structure="vesels")


def test_dense_loss_equals_monai_dice_ce():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 16, 16)
    label = (torch.rand(2, 1, 8, 16, 16) > 0.7).float()
    target, valid = split_label(label)
    assert float(dice_bce(logits, target, valid)) == pytest.approx(float(DiceCELoss(sigmoid=True)(logits, label)), abs=1e-6)


def test_batch_dice_equals_monai_batch_dice_ce():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 16, 16)
    label = (torch.rand(2, 1, 8, 16, 16) > torch.tensor([0.7, 0.99]).view(2, 1, 1, 1, 1)).float()
    target, valid = split_label(label)
    expected = float(DiceCELoss(sigmoid=True, batch=True)(logits, label))
    assert float(dice_bce(logits, target, valid, batch_dice=True)) == pytest.approx(expected, abs=1e-6)
    assert float(dice_bce(logits, target, valid)) != pytest.approx(expected, abs=1e-2)  # per patch differs


def test_batch_dice_gives_false_positives_on_an_empty_patch_a_gradient():
    torch.manual_seed(0)
    label = torch.zeros(2, 1, 8, 16, 16)
    label[0, :, 2:6, 4:12, 4:12] = 1  # the second patch has no foreground
    target, valid = split_label(label)
    logits = torch.full((2, 1, 8, 16, 16), 2.0)  # foreground everywhere: false positives in patch 2

    def dice_gradient_on_empty_patch(batch_dice):
        x = logits.clone().requires_grad_(True)
        dice_bce(x, target, valid, bce_weight=0.0, batch_dice=batch_dice).backward()
        return float(x.grad[1].abs().sum())

    assert dice_gradient_on_empty_patch(False) < 1e-6  # per patch: ~1 whatever patch 2 predicts
    assert dice_gradient_on_empty_patch(True) > 1e-3


def test_unlabelled_voxels_do_not_move_the_loss():
    torch.manual_seed(0)
    label = (torch.rand(1, 1, 8, 16, 16) > 0.7).float()
    label[..., :4, :, :] = IGNORE
    target, valid = split_label(label)
    logits = torch.randn(1, 1, 8, 16, 16)
    changed = logits.clone()
    changed[..., :4, :, :] = 50.0  # only unlabelled voxels differ
    assert float(dice_bce(logits, target, valid)) == pytest.approx(float(dice_bce(changed, target, valid)))
    assert float(soft_cldice(logits, target, valid, 3)) == pytest.approx(float(soft_cldice(changed, target, valid, 3)))
    changed[..., 5, :, :] = 50.0  # a labelled plane: now it must move
    assert float(dice_bce(logits, target, valid)) != pytest.approx(float(dice_bce(changed, target, valid)))


def test_soft_cldice_prefers_a_connected_tube_to_a_broken_one():
    tube = torch.zeros(1, 1, 16, 32, 32)
    tube[..., 6:10, 14:18, 2:30] = 1
    broken = tube.clone()
    broken[..., 12:20] = 0
    valid = torch.ones_like(tube)

    def loss(prediction):
        return float(soft_cldice((prediction * 2 - 1) * 20, tube, valid, 3))

    assert loss(tube) < 0.05 < loss(broken)
    # Samples weighted 0 (not tubular) do not count.
    both = torch.cat([tube, broken])
    weighted = soft_cldice((both * 2 - 1) * 20, torch.cat([tube, tube]), torch.ones_like(both), 3,
                           weights=torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(loss(tube), abs=1e-6)


def test_init_loads_a_whole_model_from_a_manifest(tmp_path, tiny_model_config, tiny_model):
    from ..conftest import make_weights
    from lsmseg.model import build_model
    from lsmseg_training.engine import load_full_model

    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    torch.manual_seed(1)
    fresh = build_model(tiny_model_config)
    source = load_full_model(fresh, manifest, tiny_model_config)
    assert source["sha256"] and all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                      tiny_model.state_dict().values()))


def test_init_refuses_another_architecture(tmp_path, tiny_model_config, tiny_model):
    import dataclasses

    from ..conftest import make_weights
    from lsmseg.model import build_model
    from lsmseg_training.engine import load_full_model

    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    other = dataclasses.replace(tiny_model_config, feature_size=24)
    with pytest.raises(WeightsError, match="another architecture \\(feature_size 12 there, 24 in the config\\)"):
        load_full_model(build_model(other), manifest, other)


def _every_sparse_value(folder, extra=None):
    """A tiny sparse label holding each of TRAILMAP's values (and ``extra``, when given) on one plane."""
    shape = (8, 16, 16)
    label = np.zeros(shape, np.uint8)
    label[4] = 1  # background
    label[4, 2:6, 2:6] = 2  # axon
    label[4, 10:14, 10:14] = 3  # artifact: a bright non-axon, which TRAILMAP's loss counts as background
    label[4, 0, 0:4] = 4  # edge: unlabelled
    if extra is not None:
        label[4, 15, 15] = extra
    io.write_volume(np.random.default_rng(0).integers(0, 100, shape, dtype=np.uint16), folder / "volume.tif")
    io.write_volume(label, folder / "sparse_label.tif")
    return VolumeSet(images=folder / "volume.tif", labels=folder / "sparse_label.tif", label_mode="sparse"), label


def _training_reading(volume_set, shape):
    """Training's (foreground, valid) of a whole sparse label, from one patch covering it, and its record."""
    (record,) = prepare_volumes(DataConfig(train=[volume_set]), "train", need_labels=True, where="cfg")
    _, patch = read_patch(record, VolumeCache(64), (0, 0, 0), shape, np.random.default_rng(0))
    return patch == 1, patch != IGNORE, record


def test_training_reads_a_sparse_label_as_evaluation_scores_it(tmp_path):
    # Was: artifact voxels (3) left out of the loss, where evaluation scores them as background.
    from lsmseg_evaluation.labels import label_masks

    volume_set, label = _every_sparse_value(tmp_path)
    foreground, valid, record = _training_reading(volume_set, label.shape)
    expected_foreground, expected_valid = label_masks(label, "sparse_label.tif", "sparse")
    assert (valid == expected_valid).all() and (foreground == expected_foreground).all()
    assert valid[4, 10:14, 10:14].all() and not foreground[4, 10:14, 10:14].any()  # artifact: background
    assert record.foreground_fraction == pytest.approx(16 / (16 * 16 - 4))


def test_a_sparse_value_of_unknown_meaning_is_refused(tmp_path):
    # Was: silently unlabelled in training, refused by evaluation.
    volume_set, _ = _every_sparse_value(tmp_path, extra=5)
    with pytest.raises(InputError, match=r"sparse_label\.tif: sparse label has values \[0, 1, 2, 3, 4, 5\]"):
        prepare_volumes(DataConfig(train=[volume_set]), "train", need_labels=True, where="cfg")


def test_a_sparse_label_is_checked_before_it_is_cast(tmp_path):
    # Was (scripts/gpu_pack_data.py): cast to uint8 unchecked, so 258 became 2 = foreground.
    from lsmseg_training.data import sparse_label

    label = np.zeros((2, 8, 8), np.uint16)
    label[0, :2] = 1
    label[1, :2] = 258
    io.write_volume(label, tmp_path / "s.tif")
    with pytest.raises(InputError, match=r"s\.tif: sparse label has values \[0, 1, 258\]"):
        sparse_label(tmp_path / "s.tif")
    label[1, :2] = 2
    io.write_volume(label, tmp_path / "s.tif")
    assert sparse_label(tmp_path / "s.tif").tolist() == label.astype(np.uint8).tolist()


def test_training_reads_the_real_trailmap_label_as_evaluation_scores_it(real_data):
    from lsmseg_evaluation.labels import label_masks

    path = real_data / "trailmap" / "sparse_label.tif"
    label = io.read_volume(path).load()
    volume_set = VolumeSet(images=real_data / "trailmap" / "volume.tif", labels=path, label_mode="sparse")
    foreground, valid, record = _training_reading(volume_set, label.shape)
    expected_foreground, expected_valid = label_masks(label, path, "sparse")
    assert (valid == expected_valid).all() and (foreground == expected_foreground).all()
    assert set(np.flatnonzero(valid.any(axis=(1, 2)))) == {17, 48, 77}  # the README's labelled planes
    # The file's own counts (np.unique: 26774 of 1 background, 7190 of 2 axon, 9236 of 4 edge, no 3):
    # training and evaluation share one reader, so only fixed figures catch a change in it.
    assert int(foreground.sum()) == 7190 and int(valid.sum()) == 26774 + 7190
    assert record.foreground_fraction == pytest.approx(expected_foreground[expected_valid].mean())
