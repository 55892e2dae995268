"""Readers and writers against hostile and careless inputs (issue 11): declared-size limits, data
files confined to the header's folder, one-line errors for lazy reads, metadata round-trips."""

import os
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import zarr

from lsmseg import io
from lsmseg.errors import InputError, OutputError

from .hostile_files import forged_tiff, metaimage


# ------------------------------------------------------------------------------ size limits


def test_forged_compressed_tiff_declaring_12_gigavoxels_is_refused_before_reading(tmp_path):
    path = forged_tiff(tmp_path / "bomb.tif", pages=200, width=8000, height=8000, compression=8)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="voxels, above the limit"):
        io.read_volume(path, lazy=True)
    # Even with the cap lifted, 12.8 GB cannot come out of a few KB of deflate data.
    with pytest.raises(InputError, match="compressed bytes can hold"):
        io.read_volume(path, lazy=True, max_voxels=10**12)


def test_forged_page_of_ten_gigapixels_is_refused_before_any_strip_is_decoded(tmp_path):
    path = forged_tiff(tmp_path / "page.tif", pages=1000, width=100_000, height=100_000, compression=8)
    with pytest.raises(InputError, match="TIFF page declares"):
        io.read_volume(path, lazy=True)


def test_uncompressed_tiff_declaring_more_than_the_file_holds(tmp_path):
    path = forged_tiff(tmp_path / "shared.tif", pages=50, width=64, height=64, compression=1)
    with pytest.raises(InputError, match="holds only"):
        io.read_volume(path, lazy=True)


def test_tiff_with_300000_pages_is_refused_without_parsing_them(tmp_path):
    path = forged_tiff(tmp_path / "pages.tif", pages=300_000, width=1, height=1)
    start = time.perf_counter()
    with pytest.raises(InputError, match="more than 100,000 pages"):
        io.read_volume(path, lazy=True)
    # A hang guard, not a speed target: before the fix tifffile took 86 s and 885 MB on this file.
    assert time.perf_counter() - start < 30


def test_mha_declaring_ten_teravoxels_never_reaches_itk(tmp_path):
    path = metaimage(tmp_path / "huge.mha", dims=(100_000, 100_000, 1000), payload=b"\0" * 64)
    with pytest.raises(InputError, match="above the limit"):
        io.read_volume(path)
    short = metaimage(tmp_path / "short.mha", dims=(100, 100, 100), payload=b"\0" * 64)
    with pytest.raises(InputError, match="holds only"):
        io.read_volume(short, max_voxels=10**9)


def test_a_truncated_file_is_reported_with_the_pixel_bytes_it_holds_not_its_size(tmp_path):
    short = metaimage(tmp_path / "short.mha", dims=(100, 100, 100), payload=b"\0" * 64)
    with pytest.raises(InputError, match=r"\(1,000,000 bytes\) but the file holds only 64 bytes of pixel data"):
        io.read_volume(short, max_voxels=10**9)
    nifti = tmp_path / "short.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.uint8)), str(nifti))
    nifti.write_bytes(nifti.read_bytes()[: 352 + 100])  # NIfTI-1: 348-byte header, pixels from byte 352
    with pytest.raises(InputError, match=r"\(256 bytes\) but the file holds only 100 bytes of pixel data"):
        io.read_volume(nifti)


def test_a_bilevel_tiff_is_read_and_its_truncation_still_refused(tmp_path):
    # tifffile writes bool as 1 bit a voxel; the size check counted a byte a voxel and refused
    # every such file as "truncated or forged".
    mask = np.zeros((8, 40, 40), bool)
    mask[2:5, 10:20, 10:20] = True
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    for lazy in (False, True):
        volume = io.read_volume(tmp_path / "mask.tif", lazy=lazy)
        assert np.array_equal(np.asarray(volume.data[:]) if lazy else volume.load(), mask)
    # The size check counts a bit a voxel for them: 8 x 40 x 40 voxels need 1,600 bytes, not 12,800.
    from lsmseg.io.volume import check_declared_size

    check_declared_size(tmp_path / "mask.tif", (8, 40, 40), 1 / 8, None, stored_bytes=1600, what="TIFF")
    with pytest.raises(InputError, match=r"\(1,600 bytes\) but the file holds only 1,599 bytes"):
        check_declared_size(tmp_path / "mask.tif", (8, 40, 40), 1 / 8, None, stored_bytes=1599, what="TIFF")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "detached"])
def test_a_compressed_metaimage_that_does_not_inflate_is_refused(tmp_path, damage):
    # ITK printed "Uncompress failed" and returned whatever it had inflated (values 0-245 for a
    # payload of 20 bytes of "x"): lsmseg segmented it and exited 0.
    image = np.random.default_rng(0).integers(0, 4000, (20, 30, 40)).astype(np.uint16)
    good = tmp_path / ("good.mhd" if damage == "detached" else "good.mha")
    sitk.WriteImage(sitk.GetImageFromArray(image), str(good), True)
    assert np.array_equal(io.read_volume(good).load(), image)
    data_file = good.with_suffix(".zraw") if damage == "detached" else good
    data = data_file.read_bytes()
    start = data.index(b"ElementDataFile = LOCAL\n") + 24 if damage != "detached" else 0
    payload = b"x" * 20 if damage == "garbage" else data[start : start + (len(data) - start) // 2]
    data_file.write_bytes(data[:start] + payload)
    with pytest.raises(InputError, match=r"good\.mh[ad]: (corrupt compressed MetaImage data|compressed MetaImage "
                                         r"data ends early)"):
        io.read_volume(good)


def test_zarr_chunk_larger_than_the_cap_is_refused(tmp_path):
    root = zarr.open_group(str(tmp_path / "bomb.zarr"), mode="w")
    root.create_array("0", shape=(4, 8, 8), chunks=(4000, 8000, 8000), dtype="uint8")
    with pytest.raises(InputError, match="zarr chunk declares"):
        io.read_volume(tmp_path / "bomb.zarr", lazy=True, max_voxels=10**9)


def test_voxel_cap_from_argument_and_environment(tmp_path, monkeypatch):
    path = io.write_volume(np.ones((4, 10, 10), np.uint16), tmp_path / "v.tif")
    assert io.read_volume(path).shape == (4, 10, 10)
    with pytest.raises(InputError, match="above the limit of 399"):
        io.read_volume(path, max_voxels=399)
    monkeypatch.setenv("LSMSEG_MAX_VOXELS", "100")
    with pytest.raises(InputError, match="above the limit of 100 "):
        io.read_volume(path)
    monkeypatch.setenv("LSMSEG_MAX_VOXELS", "lots")
    with pytest.raises(InputError, match="LSMSEG_MAX_VOXELS"):
        io.read_volume(path)


def test_free_disk_space_is_checked_for_the_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    io.check_output_space(tmp_path / "m.tif", (10, 100, 80))  # 80 000 voxels, 10 kB at one bit each
    with pytest.raises(OutputError, match="not enough free disk space"):
        io.check_output_space(tmp_path / "m.tif", (10, 100, 100))


# ------------------------------------------------------------------------------ confined data files


def test_mha_must_hold_its_own_pixels(tmp_path):
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"\1" * 256)
    case = tmp_path / "case"
    case.mkdir()
    for target in (str(outside), "/dev/zero"):
        with pytest.raises(InputError, match="ElementDataFile = LOCAL"):
            io.read_volume(metaimage(case / "x.mha", data_file=target))


def test_mhd_and_nhdr_data_files_must_lie_in_the_header_folder(tmp_path):
    (tmp_path / "secret.raw").write_bytes(b"\1" * 256)
    case = tmp_path / "case"
    case.mkdir()
    for name in ("../secret.raw", str(tmp_path / "secret.raw"), "/dev/zero"):
        with pytest.raises(InputError, match="outside the header's folder"):
            io.read_volume(metaimage(case / "x.mhd", data_file=name))
    os.symlink(tmp_path / "secret.raw", case / "link.raw")  # a link inside that points outside
    with pytest.raises(InputError, match="outside the header's folder"):
        io.read_volume(metaimage(case / "x.mhd", data_file="link.raw"))
    with pytest.raises(InputError, match="list or pattern"):
        io.read_volume(metaimage(case / "x.mhd", data_file="slice%03d.raw 1 4 1"))
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 4\nencoding: raw\ndata file: {}\n\n"
    (case / "x.nhdr").write_text(header.format("../secret.raw"))
    with pytest.raises(InputError, match="outside the header's folder"):
        io.read_volume(case / "x.nhdr")
    # The same headers with their data beside them are read.
    (case / "x.raw").write_bytes(bytes(range(256)))
    assert io.read_volume(metaimage(case / "x.mhd", data_file="x.raw")).load().ravel()[5] == 5
    (case / "x.nhdr").write_text(header.format("x.raw"))
    assert io.read_volume(case / "x.nhdr").shape == (4, 8, 8)


# ------------------------------------------------------------------------------ lazy read errors


def tiff_with_a_corrupt_plane(path, planes: int, bad: int):
    """A zlib TIFF of ``planes`` 64x64 planes, one strip each, whose plane ``bad`` no longer inflates."""
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 4000, (planes, 64, 64), dtype=np.uint16),
                     compression="zlib", rowsperstrip=64)
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[bad].dataoffsets[0]
    raw[offset: offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(raw))
    return path


def test_corrupt_strip_is_a_one_line_input_error_when_read_lazily(tmp_path):
    path = tiff_with_a_corrupt_plane(tmp_path / "c.tif", planes=6, bad=2)
    volume = io.read_volume(path, lazy=True)
    with pytest.raises(InputError, match="cannot read TIFF pixel data"):
        volume.data[2:3]


def test_a_failed_lazy_read_leaves_no_chunk_read_pending(tmp_path):
    # zarr re-raised the first bad chunk while the others were still being read; a run ending then
    # printed hundreds of "Task was destroyed but it is pending!" lines after its one-line error.
    import asyncio

    from zarr.core import sync as zarr_sync

    path = tiff_with_a_corrupt_plane(tmp_path / "c.tif", planes=40, bad=0)  # 39 others still to read

    async def pending() -> int:
        return len(asyncio.all_tasks()) - 1

    for _ in range(5):
        with pytest.raises(InputError, match="cannot read TIFF pixel data"):
            io.read_volume(path, lazy=True).data[...]
        assert zarr_sync.sync(pending()) == 0


def test_folder_of_3d_stacks_is_not_taken_for_planes(tmp_path):
    folder = tmp_path / "stacks"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folder / name, np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(InputError, match="multi-page TIFF stacks"):
        io.read_volume(folder)


# ------------------------------------------------------------------------------ metadata round-trips


def test_ome_tiff_physical_size_is_read_and_ome_masks_keep_it(tmp_path):
    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 10), np.uint16), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 2.5, "PhysicalSizeZUnit": "µm",
        "PhysicalSizeY": 400, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 0.3})
    volume = io.read_volume(path)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.4, 0.3))
    for writer in ("whole", "blocks"):
        out = tmp_path / writer / "m.ome.tif"
        mask = np.ones(volume.shape, np.uint8)
        if writer == "whole":
            io.write_mask(mask, out, like=volume)
        else:
            io.write_mask_blocks([(tuple(slice(0, s) for s in mask.shape), mask)], out, mask.shape, like=volume)
        with tifffile.TiffFile(out) as tif:
            assert tif.is_ome
        np.testing.assert_allclose(io.read_volume(out).spacing, (2.5, 0.4, 0.3))


def test_imagej_xy_resolution_survives_without_z_spacing(tmp_path):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 10), np.uint16), imagej=True, resolution=(1 / 0.3, 1 / 0.4),
                     metadata={"axes": "ZYX", "unit": "um"})
    volume = io.read_volume(path)
    assert volume.spacing is None
    for out in (tmp_path / "whole.tif", tmp_path / "blocks.tif"):
        mask = np.ones(volume.shape, np.uint8)
        if out.stem == "whole":
            io.write_mask(mask, out, like=volume)
        else:
            io.write_mask_blocks([(tuple(slice(0, s) for s in mask.shape), mask)], out, mask.shape, like=volume)
        with tifffile.TiffFile(out) as tif:
            x, y = tif.pages[0].tags["XResolution"].value, tif.pages[0].tags["YResolution"].value
            assert x[1] / x[0] == pytest.approx(0.3) and y[1] / y[0] == pytest.approx(0.4)
            assert tif.imagej_metadata.get("unit") == "um"


@pytest.mark.parametrize("unit, scale", [("inch", 25400.0), ("mm", 1000.0), ("micrometre", 1.0)])
def test_imagej_spacing_in_other_length_units_is_read_in_micrometres(tmp_path, unit, scale):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 10), np.uint16), imagej=True, resolution=(1 / 0.3, 1 / 0.4),
                     metadata={"axes": "ZYX", "unit": unit, "spacing": 2.0})
    np.testing.assert_allclose(io.read_volume(path).spacing, (2.0 * scale, 0.4 * scale, 0.3 * scale))


@pytest.mark.parametrize("zarr_format, version", [(2, "0.4"), (3, "0.5")])
def test_ome_zarr_keeps_units_translation_and_writes_ngff_for_its_zarr_version(tmp_path, zarr_format, version):
    path = tmp_path / "in.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    root.create_array("0", shape=(4, 16, 16), dtype="uint16", chunks=(4, 16, 16))[...] = 7
    multiscale = {
        "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.004, 0.001, 0.001]},
            {"type": "translation", "translation": [1.5, -2.0, 3.25]}]}],
    }
    if zarr_format == 2:
        root.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    volume = io.read_volume(path, lazy=True)
    np.testing.assert_allclose(volume.spacing, (4.0, 1.0, 1.0))
    out = tmp_path / "out.ome.zarr"
    mask = np.ones(volume.shape, np.uint8)
    io.write_mask_blocks([(tuple(slice(0, s) for s in mask.shape), mask)], out, mask.shape, like=volume)
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == zarr_format
    attrs = dict(group.attrs)
    if zarr_format == 2:
        assert "ome" not in attrs and attrs["multiscales"][0]["version"] == "0.4"
        written = attrs["multiscales"][0]
    else:
        assert "multiscales" not in attrs and attrs["ome"]["version"] == "0.5"
        written = attrs["ome"]["multiscales"][0]
    assert [a["unit"] for a in written["axes"]] == ["millimeter"] * 3
    transforms = {t["type"]: t for t in written["datasets"][0]["coordinateTransformations"]}
    assert transforms["translation"]["translation"] == [1.5, -2.0, 3.25]
    np.testing.assert_allclose(transforms["scale"]["scale"], [0.004, 0.001, 0.001])
    np.testing.assert_allclose(io.read_volume(out).spacing, (4.0, 1.0, 1.0))


def test_zarr_folder_without_suffix_is_read_and_written_as_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "volume"), mode="w")
    root.create_array("0", shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8))[...] = 1
    volume = io.read_volume(tmp_path / "volume")
    assert volume.fmt == "zarr"
    out = tmp_path / "out" / "volume"
    io.write_mask(np.ones(volume.shape, np.uint8), out, like=volume)
    assert io.detect_format(out) == "zarr" and not list(out.glob("*.tif"))


def test_nifti_origin_and_spacing_round_trip(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 6, 8), np.uint16))
    image.SetSpacing((0.3, 0.4, 2.5))
    image.SetOrigin((10.0, -4.0, 7.5))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    volume = io.read_volume(tmp_path / "v.nii.gz")
    io.write_mask(np.ones(volume.shape, np.uint8), tmp_path / "m.nii.gz", like=volume)
    mask = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(mask.GetSpacing(), (0.3, 0.4, 2.5), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), (10.0, -4.0, 7.5), rtol=1e-6)


# ------------------------------------------------------------------------------ partial files


def test_stale_partials_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".partial-999999999-0123abcd-a.tif"
    dead.write_bytes(b"x")
    mine = tmp_path / f".partial-{os.getpid()}-0123abcd-b.tif"
    (mine).mkdir()
    live = tmp_path / f".partial-{os.getppid()}-0123abcd-c.tif"
    live.write_bytes(b"x")
    old = tmp_path / ".partial-0123abcd-d.tif"  # the name older versions used
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    removed = io.sweep_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, mine.name, old.name])
    assert live.exists() and not dead.exists() and not mine.exists()


def test_overwriting_an_input_is_refused(tmp_path):
    a = io.write_volume(np.zeros((2, 4, 4), np.uint8), tmp_path / "a.tif")
    with pytest.raises(OutputError, match="overwrite the input"):
        io.refuse_overwriting_inputs([(a, tmp_path / "a.tif")])
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
    with pytest.raises(OutputError, match="overwrite the input"):
        io.refuse_overwriting_inputs([(a, tmp_path.parent / f"{tmp_path.name}-link" / "a.tif")])
    planes = tmp_path / "planes"
    planes.mkdir()
    with pytest.raises(OutputError, match="inside the input"):
        io.refuse_overwriting_inputs([(planes, planes / "planes")])
    io.refuse_overwriting_inputs([(a, tmp_path / "out" / "a.tif")])


def test_outputs_inside_an_input_folder_argument_are_refused(tmp_path):
    a = io.write_volume(np.zeros((2, 4, 4), np.uint8), tmp_path / "a" / "x.tif")
    # The volumes listed from folder a: their masks may not go into a/sub (a later run would list it).
    with pytest.raises(OutputError, match="inside the input"):
        io.refuse_overwriting_inputs([(a, tmp_path / "a" / "sub" / "x.tif")], input_folders=[tmp_path / "a"])
    # A file named on its own may have its masks beside it.
    io.refuse_overwriting_inputs([(a, tmp_path / "a" / "sub" / "x.tif")])
    io.refuse_overwriting_inputs([(a, tmp_path / "a" / "sub" / "x.tif")], input_folders=[a])


def test_colliding_outputs_are_found_case_folded(tmp_path):
    targets = [(0, tmp_path / "out" / "x.tif"), (1, tmp_path / "out" / "X.TIF"), (2, tmp_path / "out" / "y.tif"),
               (2, tmp_path / "probabilities" / "y.tif")]
    assert io.colliding_outputs(targets) == {str(tmp_path / "out" / "x.tif"): [0, 1]}


def test_a_folder_where_a_mask_file_goes_is_refused_never_deleted(tmp_path):
    target = tmp_path / "out" / "x.tif"
    (target / "keep.txt").parent.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    assert io.mask_format_for(target) == "tiff"  # the suffix decides, not what is there
    with pytest.raises(OutputError, match="already exists as a folder, but the output is a file"):
        io.write_mask(np.zeros((2, 4, 4), np.uint8), target)
    assert (target / "keep.txt").read_text() == "mine"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")], "no partial output left"


def test_a_file_where_a_plane_folder_goes_is_refused_and_same_kinds_are_replaced(tmp_path):
    planes = tmp_path / "out" / "planes"
    planes.parent.mkdir()
    planes.write_text("not a mask")
    with pytest.raises(OutputError, match="already exists as a file, but the output is a folder"):
        io.write_mask(np.zeros((2, 4, 4), np.uint8), planes)
    assert planes.read_text() == "not a mask"
    # An earlier mask of the same kind is replaced, as before.
    io.write_mask(np.zeros((2, 4, 4), np.uint8), tmp_path / "out" / "x.tif")
    io.write_mask(np.ones((2, 4, 4), np.uint8), tmp_path / "out" / "x.tif")
    assert io.read_volume(tmp_path / "out" / "x.tif").load().all()


def test_control_characters_in_a_file_name_stay_on_one_line(tmp_path):
    error = InputError(tmp_path / "bad\nERROR: fake.tif", "cannot read TIFF: \x1b[2Jcorrupt")
    assert "\n" not in str(error) and "\x1b" not in str(error)
    assert "bad\\nERROR: fake.tif" in str(error) and "\\x1b[2Jcorrupt" in str(error)
    assert error.path.name == "bad\nERROR: fake.tif"  # the path itself is kept as it is


def test_file_errors_survive_pickling(tmp_path):
    """A process pool returns a worker's error pickled: path, reason, record and class are kept
    (an exception pickles as type(*args), and these take (path, reason), not the message)."""
    import pickle

    from lsmseg.errors import ProvenanceError

    error = pickle.loads(pickle.dumps(InputError(tmp_path / "a.tif", "cannot read  TIFF")))
    assert type(error) is InputError and error.path == tmp_path / "a.tif" and error.reason == "cannot read TIFF"
    assert str(error) == str(InputError(tmp_path / "a.tif", "cannot read TIFF"))
    late = ProvenanceError(OutputError(tmp_path / "m.json", "disk full"), tmp_path / "m.tif", {"volume": "m"})
    again = pickle.loads(pickle.dumps(late))
    assert isinstance(again, OutputError) and again.record == {"volume": "m"} and str(again) == str(late)


def test_truncated_tiff_is_one_error_line_on_the_command_line(tmp_path, capsys, tiny_weights):
    from lsmseg.cli import main

    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.arange(4000, dtype=np.uint16).reshape(10, 20, 20))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.tif").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "t.tif" in errors[0] and "truncated" in errors[0]


# ------------------------------------------------------------------------------ hostile files, round 2


def _pages(path, planes):
    with tifffile.TiffWriter(path) as tif:
        for plane in planes:
            tif.write(plane, metadata=None, photometric="minisblack")
    return path


def test_tiff_whose_pages_differ_is_refused_not_read_with_planes_dropped(tmp_path):
    plane = np.arange(64, dtype=np.uint16).reshape(8, 8)
    # tifffile groups the three 8 x 8 pages into one series and leaves the odd one out: the
    # volume would be 3 planes of 4, the 4th page taking the 3rd's place.
    shapes = _pages(tmp_path / "shapes.tif", [plane, plane, plane[:4, :4], plane])
    types = _pages(tmp_path / "types.tif", [plane, plane, plane.astype(np.uint8)])
    for path in (shapes, types):
        for lazy in (False, True):
            with pytest.raises(InputError, match="pages differ in shape or type"):
                io.read_volume(path, lazy=lazy)
    two = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(two, ome=True) as tif:
        for _ in range(2):
            tif.write(np.zeros((3, 8, 8), np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    with pytest.raises(InputError, match="holds 2 images"):
        io.read_volume(two)
    # A reduced-resolution page (a thumbnail) is not a second image.
    thumb = tmp_path / "thumb.tif"
    with tifffile.TiffWriter(thumb) as tif:
        tif.write(np.zeros((3, 8, 8), np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
        tif.write(np.zeros((4, 4), np.uint16), subfiletype=1, metadata=None)
    assert io.read_volume(thumb).shape == (3, 8, 8)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_truncated_nii_gz_is_refused_not_zero_filled(tmp_path, dtype):
    import gzip

    array = np.random.default_rng(0).integers(1, 1000, (10, 30, 30)).astype(dtype)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "full.nii.gz"))
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])  # ITK read it, the rest as zeros
    with pytest.raises(InputError, match="truncated"):
        io.read_volume(tmp_path / "cut.nii.gz")
    # Complete streams are read, also as two gzip members or with zero padding after the stream.
    plain = gzip.decompress(raw)
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]))
    (tmp_path / "pad.nii.gz").write_bytes(raw + b"\0" * 8)
    for name in ("full.nii.gz", "two.nii.gz", "pad.nii.gz"):
        np.testing.assert_array_equal(io.read_volume(tmp_path / name).load(), array)


def test_nifti_with_scl_slope_is_read_and_a_forged_vox_offset_refused(tmp_path):
    import struct

    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 40, 40), 10, np.uint16)), str(tmp_path / "base.nii"))
    raw = bytearray((tmp_path / "base.nii").read_bytes())
    scaled = bytearray(raw)
    scaled[112:120] = struct.pack("<ff", 2.5, 1.0)  # scl_slope, scl_inter: ITK returns float32
    (tmp_path / "scaled.nii").write_bytes(bytes(scaled))
    volume = io.read_volume(tmp_path / "scaled.nii")  # was refused: "declares 32,000 bytes, holds 16,000"
    assert volume.dtype == np.float32 and np.all(volume.load() == 26.0)
    for value in (-5.0, 100.0, float("nan")):  # ITK read shifted voxels (or raised ValueError here)
        forged = bytearray(raw)
        forged[108:112] = struct.pack("<f", value)
        (tmp_path / "forged.nii").write_bytes(bytes(forged))
        with pytest.raises(InputError, match="vox_offset"):
            io.read_volume(tmp_path / "forged.nii")


@pytest.mark.parametrize("multiscales", [
    [{"version": "0.4", "datasets": []}],
    "not a list",
    [{"datasets": [{"path": "../elsewhere"}]}],
    [{"datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": 5}]}]}],
])
def test_malformed_ome_zarr_metadata_is_a_one_line_input_error(tmp_path, multiscales):
    root = zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="w")
    root.create_array("0", shape=(3, 8, 8), dtype="uint8")
    root.attrs["multiscales"] = multiscales
    with pytest.raises(InputError, match="malformed OME-Zarr metadata"):
        io.read_volume(tmp_path / "v.ome.zarr")


def test_zarr_group_whose_0_is_a_group_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_group("0")
    with pytest.raises(InputError, match="no array '0'"):
        io.read_volume(tmp_path / "g.zarr")


def test_links_out_of_a_plane_folder_or_a_zarr_store_listed_from_an_input_folder_are_refused(tmp_path):
    """Volumes listed from an input folder read nothing outside it, links inside a plane folder or a
    zarr store included (check_targets, before any work); a path the user names is the user's choice."""
    from lsmseg.inference.run import check_targets

    outside = tmp_path / "outside"
    outside.mkdir()
    tifffile.imwrite(outside / "secret.tif", np.full((8, 8), 7, np.uint16))
    zarr.open_array(str(outside / "arr"), mode="w", shape=(3, 8, 8), dtype="uint16")[...] = 9
    inputs = tmp_path / "in"
    planes = inputs / "planes"
    planes.mkdir(parents=True)
    for z in range(3):
        tifffile.imwrite(planes / f"z{z}.tif", np.zeros((8, 8), np.uint16))
    os.symlink(outside / "secret.tif", planes / "z3.tif")
    store = inputs / "link.zarr"
    zarr.open_group(str(store), mode="w")
    os.symlink(outside / "arr", store / "0")
    chunked = inputs / "chunk.zarr"
    zarr.open_array(str(chunked), mode="w", shape=(3, 8, 8), chunks=(3, 8, 8), dtype="uint16")[...] = 1
    chunk = next(p for p in chunked.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    os.symlink(next(p for p in (outside / "arr").rglob("*") if p.is_file() and p.name != "zarr.json"), chunk)
    # Links that stay inside the input folder are fine (a subset of planes linking to ../raw).
    raw = inputs / "raw"
    raw.mkdir()
    tifffile.imwrite(raw / "z0.tif", np.zeros((8, 8), np.uint16))
    subset = inputs / "subset"
    subset.mkdir()
    for z in range(2):
        os.symlink(raw / "z0.tif", subset / f"z{z}.tif")
    volumes = [planes, store, chunked, subset]
    refused = check_targets(volumes, [tmp_path / "out" / v.name for v in volumes], input_folders=[inputs])
    assert sorted(refused) == [0, 1, 2]
    assert "holds z3.tif, a link to" in str(refused[0]) and "outside the input folder" in str(refused[0])
    assert "holds 0, a link to" in str(refused[1])
    assert "outside the input folder" in str(refused[2])
    # Named by the user: read as they are.
    assert io.read_volume(planes).shape == (4, 8, 8)
    assert io.read_volume(subset).shape == (2, 8, 8) and io.expand_inputs([subset]) == [subset]
    assert io.read_volume(store, lazy=True).load().max() == 9
    os.symlink(outside / "arr", tmp_path / "named.zarr")
    assert io.read_volume(tmp_path / "named.zarr").load().max() == 9


def test_hostile_files_are_one_error_line_each_and_good_volumes_still_run(tmp_path, capsys, tiny_weights):
    from lsmseg.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    plane = np.arange(64, dtype=np.uint16).reshape(8, 8)
    _pages(inputs / "pages.tif", [plane, plane, plane[:4, :4], plane])
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(6000, dtype=np.float32).reshape(6, 20, 50)),
                    str(tmp_path / "f.nii.gz"))
    (inputs / "cut.nii.gz").write_bytes((tmp_path / "f.nii.gz").read_bytes()[:2000])
    root = zarr.open_group(str(inputs / "meta.ome.zarr"), mode="w")
    root.create_array("0", shape=(3, 8, 8), dtype="uint8")
    root.attrs["multiscales"] = "not a list"
    tifffile.imwrite(inputs / "good.tif", np.random.default_rng(0).integers(0, 999, (6, 16, 16), dtype=np.uint16))
    assert main(["predict", str(inputs), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "-q"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3, errors
    for name in ("pages.tif", "cut.nii.gz", "meta.ome.zarr"):
        [line] = [e for e in errors if name in e]
        assert "unexpected" not in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.tif", "good.tif.provenance.json"]


@pytest.mark.parametrize("dtype", [np.float16, np.int64])
def test_ome_tiff_of_a_type_ome_xml_cannot_name_is_written_with_its_spacing(tmp_path, dtype):
    # --probability-dtype float16 on an .ome.tif input failed with "unexpected OmeXmlError".
    array = np.arange(3 * 8 * 8).reshape(3, 8, 8).astype(dtype)
    for writer in ("whole", "blocks"):
        out = tmp_path / writer / "p.ome.tif"
        if writer == "whole":
            io.write_volume(array, out, spacing=(2.0, 0.5, 0.25))
        else:
            io.write_mask_blocks([(tuple(slice(0, s) for s in array.shape), array)], out, array.shape,
                                 spacing=(2.0, 0.5, 0.25), dtype=dtype)
        volume = io.read_volume(out)
        assert volume.dtype == dtype and volume.spacing == pytest.approx((2.0, 0.5, 0.25))
        np.testing.assert_array_equal(volume.load(), array)


def test_planes_appended_one_by_one_read_as_a_stack_and_a_trailing_thumbnail_is_ignored(tmp_path):
    """tifffile's append=True makes each plane its own series: the pages are the stack. A smaller
    2-D page after the whole stack is a thumbnail (not marked reduced); one inside the stack is not."""
    appended = tmp_path / "appended.tif"
    for z in range(4):
        tifffile.imwrite(appended, np.full((16, 16), z, np.uint8), append=True)
    for lazy in (False, True):
        volume = io.read_volume(appended, lazy=lazy)
        assert volume.shape == (4, 16, 16) and np.asarray(volume.data[:, 0, 0]).tolist() == [0, 1, 2, 3]
    thumbnail = tmp_path / "thumbnail.tif"
    with tifffile.TiffWriter(thumbnail) as writer:
        writer.write(np.arange(5 * 32 * 32, dtype=np.uint16).reshape(5, 32, 32), metadata=None, contiguous=False)
        writer.write(np.zeros((8, 8), np.uint8), metadata=None)
    assert io.read_volume(thumbnail).shape == (5, 32, 32)
    plane = np.arange(64, dtype=np.uint16).reshape(8, 8)
    _pages(tmp_path / "inside.tif", [plane, plane, plane[:4, :4], plane])
    with pytest.raises(InputError, match="pages differ in shape or type"):
        io.read_volume(tmp_path / "inside.tif")
