"""lsmseg_training.compare: bad arguments and missing inputs are refused in one line, before any prediction."""

import pytest

from lsmseg_training.compare import main


@pytest.fixture
def folders(tmp_path):
    for folder in ("images", "labels", "run"):
        (tmp_path / folder).mkdir()
    (tmp_path / "images" / "vol_1.tif").write_bytes(b"")  # never read: every check comes first
    return tmp_path


def test_unknown_volume_name_is_one_line_naming_the_folder(folders, tiny_weights):
    # Was a bare StopIteration.
    with pytest.raises(SystemExit, match=r"^ERROR: .*images: no volume named 'nosuch'$"):
        main(["--weights", str(tiny_weights), "--images", str(folders / "images"), "--labels",
              str(folders / "labels"), "--names", "nosuch"])
    with pytest.raises(SystemExit, match=r"^ERROR: .*missing: not a folder of images$"):
        main(["--weights", str(tiny_weights), "--images", str(folders / "missing"), "--labels",
              str(folders / "labels"), "--names", "vol_1"])


def test_run_folder_without_record_is_one_line_naming_it(folders):
    # Was a FileNotFoundError traceback.
    args = ["--images", str(folders / "images"), "--labels", str(folders / "labels"), "--names", "vol_1", "--runs"]
    with pytest.raises(SystemExit, match=r"^ERROR: .*run: no run.json"):
        main([*args, str(folders / "run")])
    (folders / "run" / "run.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"^ERROR: .*run.json: cannot be read as JSON"):
        main([*args, str(folders / "run")])
    # A killed run's record names no final checkpoint yet: was a KeyError traceback.
    (folders / "run" / "run.json").write_text('{"config": {}, "best": {}}')
    with pytest.raises(SystemExit, match=r"^ERROR: .*run.json: names no final \(an unfinished run\? resume it first\)$"):
        main([*args, str(folders / "run")])


@pytest.mark.parametrize("args", [
    ["--weights", "w", "--images", "i", "--labels", "l"],  # was an IndexError after predicting nothing
    ["--runs", "r", "--names", "v"],
    [],
])
def test_incomplete_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_unreadable_volume_is_one_line(folders, tiny_weights):
    # An empty image file (and no label): lsmseg's InputError, printed as one line naming the file.
    with pytest.raises(SystemExit, match=r"^ERROR: .*vol_1.tif: "):
        main(["--weights", str(tiny_weights), "--images", str(folders / "images"), "--labels",
              str(folders / "labels"), "--names", "vol_1"])


def test_a_volume_is_found_by_its_name_not_by_a_prefix(tmp_path):
    # Was the first file named "<name>.*": "a.backup.tif" for "a", or an .mhd's data file.
    from lsmseg_training.compare import image_path_of

    for name in ("a.backup.tif", "a.nii.gz", "b.raw", "b.mhd", "c.d.tif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "b.mhd").write_text("ObjectType = Image\nElementDataFile = b.raw\n")
    assert image_path_of(tmp_path, "a") == tmp_path / "a.nii.gz"
    assert image_path_of(tmp_path, "b") == tmp_path / "b.mhd"
    assert image_path_of(tmp_path, "c.d") == tmp_path / "c.d.tif"
    with pytest.raises(SystemExit, match=r"no volume named 'c'$"):
        image_path_of(tmp_path, "c")


def _pair(folder, label):
    import numpy as np
    from lsmseg import io

    io.write_volume(np.random.default_rng(0).integers(0, 100, label.shape, dtype=np.uint16), folder / "images" / "vol_1.tif")
    io.write_volume(label, folder / "labels" / "vol_1.tif")


def test_a_sparse_label_is_refused_not_scored_with_background_as_foreground(folders, tiny_weights):
    # Was: read as != 0, so TRAILMAP's 1 = background scored as foreground, and a Dice printed.
    import numpy as np

    label = np.zeros((16, 32, 32), np.uint8)
    label[8] = 1
    label[8, 10:14, 10:14] = 2
    _pair(folders, label)
    with pytest.raises(SystemExit, match=r"^ERROR: .*labels/vol_1\.tif: compare scores binary labels only .*lsmseg evaluate --label-scheme sparse$"):
        main(["--weights", str(tiny_weights), "--images", str(folders / "images"), "--labels",
              str(folders / "labels"), "--names", "vol_1"])


def test_the_real_trailmap_label_is_refused(tmp_path, real_data):
    from lsmseg_training.compare import read_label

    (tmp_path / "volume.tif").symlink_to(real_data / "trailmap" / "sparse_label.tif")
    with pytest.raises(Exception, match=r"volume\.tif: compare scores binary labels only"):
        read_label(tmp_path, real_data / "trailmap" / "volume.tif")


def test_a_binary_label_of_any_one_value_is_foreground(folders):
    # vesselNN's santos2015 label is 0/254 (the module's own example names it).
    import numpy as np

    from lsmseg_training.compare import read_label

    label = np.zeros((4, 8, 8), np.uint16)
    label[1, 2:4, 2:4] = 254
    _pair(folders, label)
    assert (read_label(folders / "labels", folders / "images" / "vol_1.tif") == (label != 0)).all()
