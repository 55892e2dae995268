"""Review of d9fe617..HEAD: failing-before tests of what the review found."""

import numpy as np
import pytest
from lsmseg_training.config import (
    DataConfig,
    FinetuneConfig,
    VolumeSet,
    load_run_config,
)
from lsmseg_training.data import check_splits
from lsmseg_training.engine import changed_settings

from lsmseg import io
from lsmseg.config import to_dict
from lsmseg.errors import ConfigError

from ..conftest import REPO


def test_a_run_checkpointed_before_batch_dice_existed_still_resumes(tmp_path):
    # Checkpoints record their config since ddf31cb (2026-12-07 09:00); those written before
    # batch_dice was added (runs/general/finetune_mended, 15:10) lack the key, so their resume was
    # refused: "batch_dice is False in the config but was None in the run being resumed".
    config = REPO / "training" / "configs" / "general_finetune_real_logtail_mended.yaml"
    now = to_dict(load_run_config(FinetuneConfig, config, data_root=tmp_path))
    before = {key: value for key, value in now.items() if key != "batch_dice"}
    assert changed_settings(before, now) == []
    # Turned on for a run that had none, it is a change.
    assert [key for key, _, _ in changed_settings(before, {**now, "batch_dice": True})] == ["batch_dice"]


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
