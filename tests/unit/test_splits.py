"""No volume or source may reach two splits by another pattern, path, name or link.

Each case was accepted before (the check keyed a source by the set's images path and its own
pattern), so validation or test could score a volume the model was trained or tuned on.
"""

import os

import numpy as np
import pytest
from lsmseg_training.config import DataConfig, PhantomSet, VolumeSet
from lsmseg_training.data import check_splits

from lsmseg import io
from lsmseg.errors import ConfigError

PATTERN = r"^patchvolume_(\d+)_"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    for name in ("patchvolume_1008_0", "patchvolume_1008_1", "patchvolume_695_0"):
        io.write_volume(np.zeros((4, 8, 8), np.uint16), folder / f"{name}.tif")
    return folder


def test_one_volume_under_two_patterns_is_refused(images):
    data = DataConfig(validation=[VolumeSet(images=images, include=["patchvolume_1008_0"], source=PATTERN)],
                      test=[VolumeSet(images=images, include=["patchvolume_1008_0"], source=r"^(patchvolume_\d+)_")])
    with pytest.raises(ConfigError, match=r"cfg: data\.test\[0\]: volume .*patchvolume_1008_0\.tif is also in "
                                          r"data\.validation; split by source"):
        check_splits(data, "cfg")


def test_two_patterns_on_one_folder_are_refused(images):
    # patchvolume_1008_1 is no file of train, but source 1008 is: a set without a pattern hid it.
    data = DataConfig(train=[VolumeSet(images=images, include=["patchvolume_1008_0"], source=PATTERN)],
                      test=[VolumeSet(images=images, include=["patchvolume_1008_1"])])
    with pytest.raises(ConfigError, match=r"cfg: data\.test\[0\] and data\.train\[0\] read .*images with different "
                                          r"source patterns \(None and '.*'\)"):
        check_splits(data, "cfg")


def test_a_single_file_set_meets_the_set_of_its_folder(images):
    data = DataConfig(train=[VolumeSet(images=images / "patchvolume_1008_0.tif", source=PATTERN)],
                      test=[VolumeSet(images=images, include=["patchvolume_1008_1"], source=PATTERN)])
    with pytest.raises(ConfigError, match=r"cfg: source '1008' of .*images is in both data\.train and data\.test"):
        check_splits(data, "cfg")


def test_a_symbolic_link_under_another_name_is_refused(images, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(images / "patchvolume_1008_0.tif", other / "patchvolume_2000_0.tif")
    data = DataConfig(train=[VolumeSet(images=images, include=["patchvolume_1008_0"], source=PATTERN)],
                      test=[VolumeSet(images=other, source=PATTERN)])
    with pytest.raises(ConfigError, match=r"volume .*other/patchvolume_2000_0\.tif is the same file as"):
        check_splits(data, "cfg")


def test_a_hard_link_is_refused(images, tmp_path):
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(images / "patchvolume_695_0.tif", hard / "scan_695_0.tif")
    data = DataConfig(train=[VolumeSet(images=hard)],
                      test=[VolumeSet(images=images, include=["patchvolume_695_0"], source=PATTERN)])
    with pytest.raises(ConfigError, match=r"cfg: data\.test\[0\]: volume .*patchvolume_695_0\.tif is the same file "
                                          r"as .*scan_695_0\.tif in data\.train"):
        check_splits(data, "cfg")


def test_shared_phantom_seeds_are_refused(tmp_path):
    data = DataConfig(train_phantoms=PhantomSet(folder=tmp_path / "t", kinds=["cells"], per_kind=3, seed=0),
                      validation_phantoms=PhantomSet(folder=tmp_path / "v", kinds=["cells"], per_kind=1, seed=2))
    with pytest.raises(ConfigError, match=r"cfg: data\.validation_phantoms: cells phantom seed 2 is also drawn by "
                                          r"data\.train_phantoms"):
        check_splits(data, "cfg")


def test_disjoint_splits_still_pass_with_one_file_in_two_sets_of_a_split(images):
    # Same split twice (e.g. two weights of one volume) is no leak; a symlinked folder is one folder.
    link = images.parent / "images_link"
    os.symlink(images, link)
    data = DataConfig(train=[VolumeSet(images=images, include=["patchvolume_1008_0"], source=PATTERN),
                             VolumeSet(images=link, include=["patchvolume_1008_0", "patchvolume_1008_1"],
                                       source=PATTERN)],
                      test=[VolumeSet(images=images, include=["patchvolume_695_0"], source=PATTERN)],
                      train_phantoms=PhantomSet(folder=images.parent / "t", per_kind=3, seed=0),
                      validation_phantoms=PhantomSet(folder=images.parent / "v", per_kind=1, seed=100))
    splits = check_splits(data, "cfg")
    assert splits["test"] == {"images:695": ["patchvolume_695_0"]}
    assert splits["train"]["images:1008"] == ["patchvolume_1008_0"]


def test_two_patterns_on_one_folder_are_refused_whichever_set_of_a_split_comes_first(tmp_path):
    # Only the first set's pattern was kept per folder: train[1] and validation read one folder with
    # different patterns, and validation's 1008 volume shares its scan with train[1]'s.
    images = tmp_path / "images"
    for name in ("patchvolume_1008_0", "patchvolume_1008_1", "patchvolume_695_0"):
        io.write_volume(np.zeros((4, 8, 8), np.uint16), images / f"{name}.tif")
    data = DataConfig(train=[VolumeSet(images=images, include=["patchvolume_695_0"]),
                             VolumeSet(images=images, include=["patchvolume_1008_0"], source=r"^patchvolume_(\d+)_")],
                      validation=[VolumeSet(images=images, include=["patchvolume_1008_1"])])
    with pytest.raises(ConfigError, match=r"read .*images with different source patterns"):
        check_splits(data, "cfg")
