"""validate_shipped --split reads the fine-tuning config or run record that defined the split."""

import json
from pathlib import Path

import pytest

from lsmseg.errors import ConfigError
from lsmseg_evaluation.validate_shipped import read_split

REPO = Path(__file__).resolve().parents[2]


def test_split_from_the_shipped_training_config():
    config = REPO / "training" / "configs" / "general_finetune_real.yaml"
    test, validation = read_split(config, "test"), read_split(config, "validation")
    assert "santos2015_mixedSizelowContrastVessels" in test and "patchvolume_695_0" in test
    assert "patchvolume_1147_0" in validation and not test & validation


def test_split_from_a_run_record(tmp_path):
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"splits": {"test": {"images:695": ["a", "b"], "images:8858": ["c"]}}}))
    assert read_split(record, "test") == {"a", "b", "c"}
    with pytest.raises(ConfigError, match="no set 'validation'"):
        read_split(record, "validation")


def test_a_config_set_without_include_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  test:\n    - images: somewhere/images\n")
    with pytest.raises(ConfigError, match="no include list"):
        read_split(config, "test")


def test_table_means_leave_undefined_cases_out_and_count_them():
    from lsmseg_evaluation.validate_shipped import _mean_std

    # PQ is NaN when label and mask are both empty (panoptica); the mean is over defined cases.
    assert _mean_std([0.5, float("nan"), 0.7]) == "0.600 ± 0.141 (1 NaN)"
    assert _mean_std([float("nan")]) == "– (1 NaN)"
    assert _mean_std([0.25]) == "0.250"


def test_split_names_of_structures_left_out_are_not_reported_missing(tmp_path):
    """A split names bare file names of every structure; with --structures microglia the c-Fos and
    vessel names are left out quietly, while a name found nowhere is still a problem."""
    import numpy as np

    from lsmseg.io import write_volume
    from lsmseg_evaluation.validate_shipped import find_cases

    for folder, name in (("delivr/microglia", "patchvolume_8858_0"), ("delivr/cfos", "patchvolume_695_0"),
                         ("vesselnn", "santos2015")):
        for kind in ("images", "labels"):
            (tmp_path / folder / kind).mkdir(parents=True)
            write_volume(np.zeros((2, 4, 4), np.uint8), tmp_path / folder / kind / f"{name}.tif")
    wanted = {"patchvolume_8858_0", "patchvolume_695_0", "santos2015", "patchvolume_1_0"}
    cases, problems = find_cases(tmp_path, ["microglia"], wanted)
    assert [c.name for c in cases] == ["microglia_patchvolume_8858_0"]
    assert problems == [f"case 'patchvolume_1_0' not found in {tmp_path}"]


def test_the_report_says_when_settings_were_overridden_and_on_the_test_split(tmp_path):
    from lsmseg_evaluation.validate_shipped import _overrides_note, build_parser

    split = ["--split", str(REPO / "training" / "configs" / "general_finetune_real.yaml")]
    assert _overrides_note(build_parser().parse_args(split)) == ""
    note = _overrides_note(build_parser().parse_args(split + ["--threshold", "0.7", "--predict-as", "microglia=cells"]))
    assert "--threshold 0.7" in note and "--predict-as microglia=cells" in note and "never choose" in note
    validation = _overrides_note(build_parser().parse_args(split + ["--set", "validation", "--threshold", "0.7"]))
    assert "--threshold 0.7" in validation and "never choose" not in validation


def test_masks_from_different_weights_are_not_described_as_one_model(tmp_path):
    from lsmseg_evaluation.validate_shipped import _weights_note

    files = []
    for i, digest in enumerate(("a" * 64, "b" * 64)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps({"weights": {"file": "w.safetensors", "sha256": digest},
                                         "parameters": {"device": "cpu"}}))
    assert "2 different weights" in _weights_note(files, 1.0, 2)
    assert "aaaaaaaaaaaa" in _weights_note(files[:1], 1.0, 1) and "different" not in _weights_note(files[:1], 1.0, 1)
