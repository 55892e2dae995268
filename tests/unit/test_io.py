import numpy as np
import pytest
import tifffile

from lsmseg import io
from lsmseg.errors import InputError, OutputError

SPACING = (5.0, 0.99, 0.99)


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.integers(0, 60000, size=(7, 20, 24)).astype(np.uint16)


@pytest.mark.parametrize("name", ["v.tif", "v.tiff", "v.nii.gz", "v.nii", "v.mha", "v.nrrd", "v.zarr", "v_planes"])
def test_round_trip_keeps_data_and_spacing(tmp_path, volume, name):
    path = io.write_volume(volume, tmp_path / name, spacing=SPACING)
    for lazy in (False, True):
        vol = io.read_volume(path, lazy=lazy)
        assert vol.shape == volume.shape
        np.testing.assert_array_equal(vol.load(), volume)
        np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-5)
    assert io.volume_name(path) == name.split(".")[0]


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.float64, np.uint32])
def test_tiff_round_trip_of_dtypes_imagej_cannot_hold(tmp_path, dtype):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    vol = io.read_volume(io.write_volume(array, tmp_path / "x.tif", spacing=SPACING))
    np.testing.assert_array_equal(vol.load(), array)
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-5)


@pytest.mark.parametrize("name", ["n.nii.gz", "n.nii", "n.mha"])
def test_nan_voxels_survive_reading(tmp_path, name):
    import SimpleITK as sitk

    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    data = io.read_volume(tmp_path / name).load()
    assert np.isnan(data[1, 2, 3]) and not np.isfinite(data[2, 2, 2]) and np.isfinite(data).sum() == array.size - 2


def test_mask_written_in_same_container_as_input(tmp_path, volume):
    io.write_volume(volume, tmp_path / "in" / "brain.nii.gz", spacing=SPACING)
    vol = io.read_volume(tmp_path / "in" / "brain.nii.gz")
    out = io.output_path_for(vol.path, tmp_path / "out")
    mask = (volume > 30000).astype(np.uint8)
    io.write_mask(mask, out, like=vol)
    assert out.name == "brain.nii.gz"
    back = io.read_volume(out)
    assert back.dtype == np.uint8 and set(np.unique(back.load())) <= {0, 1}
    np.testing.assert_allclose(back.spacing, SPACING, rtol=1e-5)
    assert back.meta["origin"] == vol.meta["origin"] and back.meta["direction"] == vol.meta["direction"]


def test_plane_folder_natural_order_and_same_plane_names(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    for z in range(1, 11):  # lexical order would read z10 before z2
        tifffile.imwrite(folder / f"z{z}.tif", np.full((5, 6), z, np.uint16))
    vol = io.read_volume(folder, lazy=True)
    assert vol.fmt == "planes" and vol.shape == (10, 5, 6)
    assert [int(vol.data[i][0, 0]) for i in range(10)] == list(range(1, 11))
    assert vol.data[1:3, 1:2].shape == (2, 1, 6)
    out = io.write_mask(np.ones((10, 5, 6), np.uint8), tmp_path / "out" / "stack", like=vol)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"z{z}.tif" for z in range(1, 11))
    assert io.expand_inputs([folder]) == [folder]  # a plane folder is one volume


def test_compressed_real_tiff_reads(real_data):
    vol = io.read_volume(real_data / "trailmap" / "volume.tif")
    assert vol.shape == (101, 120, 120) and vol.dtype == np.uint16


def test_lazy_tiff_reads_only_requested_region(tmp_path, volume):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, volume, compression="zlib")
    vol = io.read_volume(path, lazy=True)
    assert not isinstance(vol.data, np.ndarray)
    np.testing.assert_array_equal(vol.data[2:4, 5:9, :3], volume[2:4, 5:9, :3])


def _bad(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    with pytest.raises(InputError) as info:
        io.read_volume(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_inputs_give_one_line_errors(tmp_path):
    assert "empty file" in _bad(tmp_path, "empty.tif", lambda p: p.write_bytes(b""))
    assert "cannot read TIFF" in _bad(tmp_path, "corrupt.tif", lambda p: p.write_bytes(b"II*\x00" + b"\x13" * 200))
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.arange(4000, dtype=np.uint16).reshape(10, 20, 20))
    truncated = good.read_bytes()[: good.stat().st_size // 3]
    assert "truncated" in _bad(tmp_path, "truncated.tif", lambda p: p.write_bytes(truncated))
    assert "not a supported volume format" in _bad(tmp_path, "notes.csv", lambda p: p.write_text("a,b"))
    assert "2-D image" in _bad(tmp_path, "plane.tif", lambda p: tifffile.imwrite(p, np.zeros((8, 8), np.uint8)))
    msg = _bad(tmp_path, "rgb.tif", lambda p: tifffile.imwrite(p, np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb"))
    assert "channel" in msg
    msg = _bad(tmp_path, "rgb.nii.gz", lambda p: __import__("SimpleITK").WriteImage(
        __import__("SimpleITK").GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(p)))
    assert "channel" in msg
    assert "cannot read image" in _bad(tmp_path, "junk.mha", lambda p: p.write_text("not an image"))


def test_plane_folder_problems(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tifffile.imwrite(mixed / "z0.tif", np.zeros((5, 6), np.uint16))
    tifffile.imwrite(mixed / "z1.tif", np.zeros((5, 7), np.uint16))
    with pytest.raises(InputError, match="differ in shape"):
        io.read_volume(mixed)
    gap = tmp_path / "gap"
    gap.mkdir()
    for z in (0, 1, 3):
        tifffile.imwrite(gap / f"plane_{z:03d}.tif", np.zeros((5, 6), np.uint16))
    with pytest.raises(InputError, match="missing plane number.*2"):
        io.read_volume(gap)
    stepped = tmp_path / "stepped"
    stepped.mkdir()
    for z in (0, 5, 10):
        tifffile.imwrite(stepped / f"z{z:04d}.tif", np.zeros((5, 6), np.uint16))
    assert io.read_volume(stepped).shape == (3, 5, 6)
    types = tmp_path / "types"
    types.mkdir()
    tifffile.imwrite(types / "z0.tif", np.zeros((5, 6), np.uint16))
    tifffile.imwrite(types / "z1.tif", np.zeros((5, 6), np.uint8))
    with pytest.raises(InputError, match="differ in type"):
        io.read_volume(types)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "m.tif"
    with pytest.raises(RuntimeError):
        with io.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if __import__("os").access(locked, __import__("os").W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(OutputError, match="not writable"):
            io.write_mask(np.zeros((2, 2, 2), np.uint8), locked / "m.tif")
    finally:
        locked.chmod(0o700)


def test_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OutputError, match="cannot create output folder"):
        io.write_mask(np.zeros((2, 2, 2), np.uint8), blocker / "m.tif")


def test_list_volumes_sorted_and_skips_sidecars(tmp_path):
    for name in ("b10.tif", "b2.tif", "b2.provenance.json", ".hidden.tif"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in io.list_volumes(tmp_path)] == ["b2.tif", "b10.tif"]


# ------------------------------------------------------------- detached headers and upper-case suffixes

SITK_NAMES = ["v.mha", "v.mhd", "v.nrrd", "v.nhdr", "v.nii", "v.nii.gz",
              "V.MHA", "V.MHD", "V.NRRD", "V.NHDR", "V.NII", "V.NII.GZ", "my case.mhd", "my case.nhdr"]
DATA_FILES = {".mhd": ".zraw", ".nhdr": ".raw.gz"}  # what ITK's compressed writers name the data file


@pytest.mark.parametrize("name", SITK_NAMES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_sitk_round_trip_leaves_only_final_files(tmp_path, volume, name, dtype):
    array = volume.astype(dtype)
    path = io.write_volume(array, tmp_path / name, spacing=SPACING)
    stem, suffix = name.split(".", 1)
    data = DATA_FILES.get("." + suffix.lower())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name] + ([stem + data] if data else []))
    if data:  # the header names the data file by its final name
        assert f"{stem}{data}" in path.read_text(encoding="latin-1").splitlines()[-1]
    io.sweep_partials(tmp_path)  # a later run's sweep leaves a complete output alone
    vol = io.read_volume(path)
    assert vol.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.load(), array)
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-5)


@pytest.mark.parametrize("name", ["u.MHA", "u.MHD", "u.Nrrd", "u.NII", "u.NII.GZ"])
def test_upper_case_suffixes_written_by_simpleitk_read(tmp_path, volume, name):
    import SimpleITK as sitk

    lower = tmp_path / name.lower()
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(lower))
    (tmp_path / name).write_bytes(lower.read_bytes())  # the data file of u.mhd is u.raw, for both
    np.testing.assert_array_equal(io.read_volume(tmp_path / name).load(), volume)


def test_failed_detached_write_leaves_neither_file(tmp_path, volume):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="later step"):
        with io.atomic_output(out / "m.mhd") as tmp:
            io.FORMATS["sitk"].write(volume, tmp)
            assert any(p.name.endswith("m.zraw") for p in out.iterdir())
            raise RuntimeError("later step failed")
    assert list(out.iterdir()) == []


def test_detached_data_lands_before_its_header_and_goes_when_the_header_fails(tmp_path, volume, monkeypatch):
    import os

    real_replace, moved = os.replace, []

    def replace(src, dst):
        moved.append(os.path.basename(dst))
        if os.path.basename(dst) == "m.mhd" and fail:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # A file system without RENAME_EXCHANGE: the previous pair is renamed aside first.
    monkeypatch.setattr(io.atomic, "exchange_paths", lambda a, b: False)
    fail = False
    io.write_volume(volume, tmp_path / "m.mhd")
    assert moved[-2:] == ["m.zraw", "m.mhd"]
    fail = True
    with pytest.raises(OutputError, match="No space left"):
        io.write_volume(volume, tmp_path / "m.mhd")
    # the new data file is removed with the failed header: no header is left naming other data
    assert moved[-2:] == ["m.zraw", "m.mhd"] and list(tmp_path.iterdir()) == []


def test_a_replaced_folder_output_is_never_missing(tmp_path, monkeypatch):
    # Was renamed aside before the new one came in: a reader could find no output in between.
    import os

    target = tmp_path / "out"

    def write(value):
        with io.atomic_output(target, folder=True) as tmp:
            tmp.mkdir()
            (tmp / "chunk").write_text(str(value))

    write(1)
    real_replace, real_exchange, missing = os.replace, io.atomic.exchange_paths, []

    def watch(function):
        def watched(a, b, *rest):
            result = function(a, b, *rest)
            missing.extend([str(target)] if not target.exists() else [])
            return result
        return watched

    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(io.atomic, "exchange_paths", watch(real_exchange))
    write(2)
    assert missing == [] and (target / "chunk").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one gone


def test_a_replaced_pair_never_reads_as_a_mix_of_old_and_new(tmp_path, volume, monkeypatch):
    # An old header beside new data read as a wrong volume without an error (review): a pair's old
    # files go aside before the new ones come in, so a reader finds the old pair, none, or the new.
    import os

    target = tmp_path / "m.mhd"
    old, new = np.ascontiguousarray(volume[:5, :9, :11]), volume + 1  # the new data holds more than the old header asks
    io.write_volume(old, target, spacing=(1.0, 1.0, 1.0))
    real_replace, real_exchange, seen = os.replace, io.atomic.exchange_paths, []

    def read_now():
        try:
            found = io.read_volume(target)
            seen.append((found.shape, found.spacing, found.load().tobytes()))
        except Exception:
            seen.append(None)  # missing or incomplete: an error, not a wrong volume

    def watch(function):
        def watched(a, b, *rest):
            result = function(a, b, *rest)
            read_now()
            return result
        return watched

    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(io.atomic, "exchange_paths", watch(real_exchange))
    io.write_volume(new, target, spacing=(2.0, 2.0, 2.0))
    allowed = {None, (old.shape, (1.0, 1.0, 1.0), old.tobytes()), (new.shape, (2.0, 2.0, 2.0), new.tobytes())}
    assert seen and all(s in allowed for s in seen)
    assert seen[-1] == (new.shape, (2.0, 2.0, 2.0), new.tobytes())


def test_exchange_paths_swaps_or_says_it_cannot(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("b")
    if io.atomic.exchange_paths(a, b):
        assert a.read_text() == "b" and b.is_dir()
    else:  # nothing moved where the file system cannot
        assert a.is_dir() and b.read_text() == "b"


def test_killed_detached_write_is_swept(tmp_path):
    import subprocess
    import sys

    code = ("import os, sys, numpy as np; from lsmseg import io\n"
            "with io.atomic_output(sys.argv[1]) as tmp:\n"
            "    io.FORMATS['sitk'].write(np.ones((2, 3, 4), np.uint8), tmp)\n"
            "    os._exit(9)  # killed before the rename")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.nhdr")], check=False).returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(io.PARTIAL_PREFIX) for name in left)
    assert sorted(name.split("-", 3)[3] for name in left) == ["m.nhdr", "m.raw.gz"]
    io.sweep_partials(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_list_volumes_skips_data_files_of_headers(tmp_path, volume):
    import os

    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume)
    sitk.WriteImage(image, str(tmp_path / "m.mhd"), useCompression=True)  # m.zraw
    sitk.WriteImage(image, str(tmp_path / "n.mhd"))  # n.raw
    sitk.WriteImage(image, str(tmp_path / "h.nhdr"))  # h.raw
    (tmp_path / "stray.raw").write_bytes(b"x")  # named by no header: still reported
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "o.mhd").write_text("NDims = 3\nElementDataFile = stray.raw\n")
    os.symlink(outside / "o.mhd", tmp_path / "o.mhd")  # a header outside the folder is not read
    names = [p.name for p in io.list_volumes(tmp_path)]
    assert names == ["h.nhdr", "m.mhd", "n.mhd", "o.mhd", "stray.raw"]
    for name in ("h.nhdr", "m.mhd", "n.mhd"):
        np.testing.assert_array_equal(io.read_volume(tmp_path / name).load(), volume)


THIN_SHAPES = [(1, 6, 7), (5, 1, 7), (5, 6, 1), (1, 1, 1), (5, 1, 1), (1, 6, 1)]
THIN_NAMES = ["v.tif", "v.ome.tif", "v.nii", "v.nii.gz", "v.mha", "v.mhd", "v.nrrd", "v.nhdr", "v.ome.zarr",
              "v_planes"]


@pytest.mark.parametrize("shape", THIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", THIN_NAMES)
def test_volumes_with_a_length_1_axis_round_trip(tmp_path, name, shape):
    """One plane, one row or one column is still a 3-D volume: written whole and block by block,
    with and without spacing, it reads back (lazily too) with its shape, voxels and spacing."""
    array = (np.arange(np.prod(shape)).reshape(shape) % 250 + 1).astype(np.uint8)
    for spacing in (SPACING, None):
        whole = io.write_volume(array, tmp_path / "whole" / str(spacing is None) / name, spacing=spacing)
        blocks = [((slice(z, z + 1), slice(0, shape[1]), slice(0, shape[2])), array[z:z + 1]) for z in range(shape[0])]
        by_blocks = io.write_mask_blocks(blocks, tmp_path / "blocks" / str(spacing is None) / name, shape,
                                         spacing=spacing)
        for path in (whole, by_blocks):
            for lazy in (False, True):
                vol = io.read_volume(path, lazy=lazy)
                assert vol.shape == shape
                np.testing.assert_array_equal(vol.load(), array)
                if spacing is not None:
                    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int32])
@pytest.mark.parametrize("shape", [(1, 6, 7), (5, 6, 1)], ids=lambda s: "x".join(map(str, s)))
def test_thin_tiff_round_trip_of_other_dtypes(tmp_path, shape, dtype):
    array = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    vol = io.read_volume(io.write_volume(array, tmp_path / "x.tif", spacing=SPACING))
    assert vol.shape == shape and vol.dtype == array.dtype
    np.testing.assert_array_equal(vol.load(), array)
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-5)


def test_mask_of_a_tiff_stack_of_one_pixel_wide_planes(tmp_path):
    """A stack of 6 x 1 planes from another program reads as (z, 6, 1); its mask is written in the
    same container."""
    stack = np.arange(30, dtype=np.uint16).reshape(5, 6, 1)
    for plane in stack:
        tifffile.imwrite(tmp_path / "in.tif", plane, append=True, photometric="minisblack", metadata=None)
    vol = io.read_volume(tmp_path / "in.tif")
    assert vol.shape == stack.shape
    np.testing.assert_array_equal(vol.load(), stack)
    io.write_mask((vol.load() > 10).astype(np.uint8), tmp_path / "out.tif", like=vol, spacing=SPACING)
    back = io.read_volume(tmp_path / "out.tif")
    np.testing.assert_array_equal(back.load(), (stack > 10).astype(np.uint8))
    np.testing.assert_allclose(back.spacing, SPACING, rtol=1e-5)
