"""``lsmseg phantom``'s front end: bad options are one usage line (exit 2), output problems one
``ERROR: path: problem`` line (exit 1), both before any work; an image never lands without its label."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lsmseg.cli import main
from lsmseg.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, OutputError
from lsmseg.synth import phantom as phantom_module
from lsmseg.synth.phantom import KINDS, make_phantom, write_phantom

TINY = "4,16,16"


def run(capsys, *args):
    code = main(["phantom", "-q", "--shape", TINY, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_generation(monkeypatch):
    """Output checks come before any work: building a phantom here fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the phantom was built before its outputs were checked")
    monkeypatch.setattr(phantom_module, "make_phantom", refuse)


def test_negative_seed_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["phantom", "--seed", "-1", str(tmp_path / "x.tif")])
    assert exc.value.code == EXIT_USAGE
    assert "--seed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="seed"):
        make_phantom("vessels", (4, 16, 16), -1)


def test_a_shape_above_the_voxel_cap_is_refused_up_front(tmp_path, capsys, monkeypatch, no_generation):
    monkeypatch.setenv("LSMSEG_MAX_VOXELS", "1000")
    code, _, err = run(capsys, tmp_path / "x.tif")
    assert code == EXIT_USAGE
    line = one_error_line(err)
    assert "--shape" in line and "1,024" in line and "LSMSEG_MAX_VOXELS" in line
    assert not any(tmp_path.iterdir())


def test_a_shape_that_does_not_fit_in_memory_says_what_it_needs(tmp_path, capsys, monkeypatch, no_generation):
    monkeypatch.setattr(phantom_module, "available_memory", lambda: 50_000)
    code, _, err = run(capsys, tmp_path / "x.tif")
    assert code == EXIT_USAGE
    line = one_error_line(err)
    assert "--shape" in line and "memory" in line and "GiB" in line
    assert not any(tmp_path.iterdir())


def test_a_huge_shape_is_one_line_not_a_memory_error(tmp_path, capsys):
    code = main(["phantom", "-q", "--shape", "100000,100000,100000", str(tmp_path / "x.tif")])
    assert code == EXIT_USAGE
    assert "--shape" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("spacing", ["1e6,1e6,1e6", "1e-300,1,1"])
def test_an_absurd_spacing_is_a_usage_error(tmp_path, capsys, spacing, no_generation):
    code = main(["phantom", "-q", "--shape", TINY, "--spacing", spacing, str(tmp_path / "x.tif")])
    assert code == EXIT_USAGE
    assert "--spacing" in one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_out_under_a_file_is_one_error_line(tmp_path, capsys, no_generation):
    (tmp_path / "file").touch()
    for out in (tmp_path / "file" / "x.tif", tmp_path / "file"):  # file mode, folder mode
        code, _, err = run(capsys, out)
        assert code == EXIT_FAILED
        line = one_error_line(err)
        assert line.startswith(f"ERROR: {tmp_path / 'file'}") and "not a folder" in line


def test_images_as_a_file_is_one_error_line(tmp_path, capsys, no_generation):
    (tmp_path / "images").touch()
    code, _, err = run(capsys, tmp_path / "x.tif")
    assert code == EXIT_FAILED
    assert one_error_line(err).startswith(f"ERROR: {tmp_path / 'images'}")


@pytest.mark.parametrize("name", ["x.png", "x.h5", "data.v2"])
def test_an_unknown_suffix_is_a_usage_error_not_a_folder(tmp_path, capsys, name):
    code, _, err = run(capsys, tmp_path / name)
    assert code == EXIT_USAGE
    assert name in one_error_line(err) and ".tif" in err
    assert not any(tmp_path.iterdir())


def test_an_existing_folder_with_a_suffix_is_still_a_folder(tmp_path, capsys):
    (tmp_path / "data.v2").mkdir()
    code, _, _ = run(capsys, tmp_path / "data.v2")
    assert code == EXIT_OK
    assert (tmp_path / "data.v2" / "images" / "vessels_0.tif").is_file()


@pytest.mark.parametrize("name", [".tif", ".nii.gz", ".hidden.tif"])
def test_a_name_without_a_visible_base_is_refused(tmp_path, capsys, name):
    """A hidden file is skipped when a folder of volumes is listed: the phantom would be invisible."""
    code, _, err = run(capsys, tmp_path / name)
    assert code == EXIT_USAGE
    one_error_line(err)
    assert not any(tmp_path.iterdir())


def test_label_in_the_way_leaves_no_image_behind(tmp_path, capsys, no_generation):
    (tmp_path / "labels" / "x.tif").mkdir(parents=True)
    code, _, err = run(capsys, tmp_path / "x.tif")
    assert code == EXIT_FAILED
    assert one_error_line(err).startswith(f"ERROR: {tmp_path / 'labels' / 'x.tif'}: already exists as a folder")
    assert not (tmp_path / "images").exists()  # the folder the failed run made is gone too


def test_a_failed_label_write_removes_the_image_too(tmp_path, monkeypatch):
    from lsmseg.io import FORMATS

    tiff = FORMATS["tiff"]
    real_write = tiff.write

    def write(array, path, **kwargs):
        if array.dtype == np.uint8:  # the label
            raise OSError(28, "No space left on device")
        return real_write(array, path, **kwargs)

    monkeypatch.setattr(tiff, "write", write)
    with pytest.raises(OutputError, match="No space left"):
        write_phantom(tmp_path, "cells", (4, 16, 16), 0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_name_with_a_newline_prints_one_line_per_file(tmp_path, capsys):
    code, out, _ = run(capsys, tmp_path / "a\nb.tif")
    assert code == EXIT_OK
    assert len(out.strip().splitlines()) == 2 and "a\\nb.tif" in out


def test_non_ascii_and_spaces_round_trip(tmp_path, capsys):
    from lsmseg.io import read_volume

    code, _, _ = run(capsys, tmp_path / "sp ace" / "é ü 名.nii.gz")
    assert code == EXIT_OK
    label = read_volume(tmp_path / "sp ace" / "labels" / "é ü 名.nii.gz").load()
    np.testing.assert_array_equal(label, make_phantom("vessels", (4, 16, 16), 0).label)


def test_an_unknown_format_from_python_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="png"):
        write_phantom(tmp_path, "cells", (4, 16, 16), 0, fmt="png")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 4, 4), (64, 1, 1), (2, 8, 8)])
def test_every_kind_has_a_label_even_in_tiny_volumes(kind, shape):
    """A label without foreground is refused for fine-tuning; plaques' lumps fell outside tiny volumes."""
    for seed in range(12):
        p = make_phantom(kind, shape, seed)
        assert p.label.any(), (kind, shape, seed)
        assert not (p.label.astype(bool) & ~p.tissue).any()


def test_a_read_only_folder_is_one_error_line(tmp_path, capsys, monkeypatch, no_generation):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: make the folder look read-only
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path).is_relative_to(folder)
                            else real_access(path, mode, **kw))
    try:
        code, _, err = run(capsys, folder / "x.tif")
    finally:
        folder.chmod(0o755)
    assert code == EXIT_FAILED
    assert one_error_line(err).startswith(f"ERROR: {folder}") and "writable" in err
    assert not any(folder.rglob("*.tif"))


def test_a_new_folder_with_a_dot_is_named_with_a_trailing_separator(tmp_path, capsys):
    code, _, err = run(capsys, f"{tmp_path / 'phantoms_v1.2'}{os.sep}")
    assert code == EXIT_OK, err
    assert (tmp_path / "phantoms_v1.2" / "images" / "vessels_0.tif").is_file()


def test_a_seed_too_long_for_a_file_name_is_one_usage_line(tmp_path, capsys, no_generation):
    """Any seed >= 0 is accepted, but it is part of the file name: 300 digits made an OSError traceback."""
    # 240 digits: the final name fits 255 bytes, the temporary one written first (.partial-<pid>-<id>-) did not.
    for digits in (300, 240):
        code = main(["phantom", "-q", "--shape", TINY, "--seed", "9" * digits, str(tmp_path)])
        line = one_error_line(capsys.readouterr().err)
        assert code == EXIT_USAGE and "255" in line
        assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="255"):
        write_phantom(tmp_path, "cells", (4, 16, 16), 0, name="a" * 240 + ".tif")
