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
