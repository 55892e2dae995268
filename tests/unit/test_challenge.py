"""Folder / exec / invoke-case logic of the container front end, without the container."""

import dataclasses
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from lsmseg import io, weights
from lsmseg.challenge.invoke import handle_invocation
from lsmseg.challenge.runner import auto_mode, run
from lsmseg.challenge.settings import (
    DEFAULT_INPUT_SLUG, DEFAULT_OUTPUT_SLUG, ChallengeSettings, load_predictor, resolve_weights,
)
from lsmseg.cli import main
from lsmseg.config import InferenceSettings
from lsmseg.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, InputError, OutputError, WeightsError
from lsmseg.inference import Predictor, RunOptions

from ..conftest import make_weights

SPACING = (2.0, 0.75, 0.75)


@pytest.fixture
def predictor(tiny_model, tiny_model_config):
    return Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu", options=RunOptions(progress=False))


@pytest.fixture
def no_installed_weights(tmp_path, monkeypatch):
    """Nothing found unless a test says where: no env override, no source-tree weights."""
    monkeypatch.delenv("LSMSEG_WEIGHTS", raising=False)
    monkeypatch.setattr(weights, "SOURCE_TREE_WEIGHTS", tmp_path / "no-source-weights")


def volume(shape=(10, 40, 48), seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 3000).astype(dtype)


def settings_for(tmp_path, **kw) -> ChallengeSettings:
    defaults = dict(
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        model_dir=tmp_path / "opt-ml-model",
        provenance_dir=tmp_path / "provenance",
        scratch_dir=tmp_path,
    )
    defaults.update(kw)
    return ChallengeSettings(**defaults)


def error_records(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------------ folder mode


def test_folder_mode_bad_inputs_among_good_ones(tmp_path, predictor, caplog):
    """Every bad volume: one ERROR line naming it, no output; the good ones are all written."""
    src = tmp_path / "in"
    src.mkdir()
    io.write_volume(volume(seed=1), src / "good_a.tif", spacing=SPACING)
    io.write_volume(volume(seed=2).astype(np.float32), src / "good_b.nii.gz", spacing=SPACING)
    io.write_volume(volume(seed=3), src / "good_c.mha", spacing=SPACING)
    io.write_volume(np.full((6, 20, 20), 7, np.uint16), src / "constant.tif")  # -> empty mask, not an error
    io.write_volume(volume((3, 9, 11), seed=4), src / "tiny.tif")  # smaller than the ROI: padded
    bad = {
        "corrupt.tif": lambda p: p.write_bytes(b"II*\x00" + os.urandom(300)),
        "empty.tif": lambda p: p.write_bytes(b""),
        "notes.csv": lambda p: p.write_text("a,b\n1,2\n"),
        "flat.tif": lambda p: tifffile.imwrite(p, volume((40, 40))),
        "rgb.tif": lambda p: tifffile.imwrite(p, volume((5, 20, 20, 3), dtype=np.uint8), photometric="rgb"),
        "nan.nii.gz": lambda p: sitk.WriteImage(
            sitk.GetImageFromArray(np.where(volume() > 1500, np.nan, 1.0).astype(np.float32)), str(p)
        ),
        "inf.mha": lambda p: io.write_volume(np.where(volume() > 2900, np.inf, volume()).astype(np.float32), p),
    }
    for name, make in bad.items():
        make(src / name)

    with caplog.at_level(logging.INFO):
        code = run("folder", settings_for(tmp_path), predictor=predictor)

    assert code == EXIT_FAILED
    out = tmp_path / "out"
    written = sorted(p.name for p in out.iterdir() if not p.name.endswith(".provenance.json"))
    assert written == sorted(["good_a.tif", "good_b.nii.gz", "good_c.mha", "constant.tif", "tiny.tif"])
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no partial or hidden files left behind"
    errors = error_records(caplog)
    for name in bad:
        lines = [r.getMessage() for r in errors if name in r.getMessage()]
        assert len(lines) == 1, (name, [r.getMessage() for r in errors])
        assert "\n" not in lines[0] and lines[0].startswith(str(src / name))
    assert len(errors) == len(bad)

    # masks: same shape and spacing, uint8 {0, 1}; the constant volume gives an empty mask
    for name in ("good_a.tif", "good_b.nii.gz", "good_c.mha"):
        mask, image = io.read_volume(out / name), io.read_volume(src / name)
        assert mask.shape == image.shape and mask.dtype == np.uint8
        assert set(np.unique(mask.load())) <= {0, 1}
        np.testing.assert_allclose(mask.spacing, SPACING, rtol=1e-5)
    assert not io.read_volume(out / "constant.tif").load().any()
    assert io.read_volume(out / "tiny.tif").shape == (3, 9, 11)


def test_folder_mode_all_good_exits_zero(tmp_path, predictor):
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_OK
    assert (tmp_path / "out" / "x.tif").is_file() and (tmp_path / "out" / "x.tif.provenance.json").is_file()


def test_empty_input_is_a_clear_message_and_exit_zero(tmp_path, caplog, no_installed_weights):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "inputs.json").write_text("[]")  # sidecars are not volumes
    with caplog.at_level(logging.INFO):
        # no weights are installed: an empty input must not even need them
        assert run("folder", settings_for(tmp_path)) == EXIT_OK
    assert any("no volumes found" in r.getMessage() for r in caplog.records)


def test_missing_input_folder_is_an_error(tmp_path, predictor, caplog):
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    assert "input folder does not exist" in error_records(caplog)[0].getMessage()


def test_an_input_that_is_a_file_is_not_called_missing(tmp_path, predictor, caplog):
    io.write_volume(volume(), tmp_path / "x.tif")
    assert run("folder", settings_for(tmp_path, input_dir=tmp_path / "x.tif"), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert record.getMessage().startswith(str(tmp_path / "x.tif")) and "not a folder" in record.getMessage()
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_clear_line(tmp_path, predictor, caplog):
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    (tmp_path / "out").write_text("a file where the output folder should be")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert str(tmp_path / "out") in record.getMessage() and "not writable" in record.getMessage()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path, predictor, caplog):
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    (tmp_path / "out").mkdir(mode=0o500)
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    assert "not writable" in error_records(caplog)[0].getMessage()


# ------------------------------------------------------------------------------ weights


def test_no_weights_says_so(tmp_path, caplog, no_installed_weights):
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    assert run("folder", settings_for(tmp_path)) == EXIT_FAILED
    [record] = error_records(caplog)
    assert "no trained weights are installed" in record.getMessage()
    assert not (tmp_path / "out" / "x.tif").exists()


def test_tampered_weights_refuse_to_run_and_name_the_file(tmp_path, tiny_model_config, tiny_model, caplog,
                                                          no_installed_weights):
    manifest = make_weights(tmp_path / "opt-ml-model", tiny_model_config, tiny_model)
    checkpoint = manifest.parent / "general.safetensors"
    with open(checkpoint, "ab") as handle:
        handle.write(b"\0")
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    assert run("folder", settings_for(tmp_path)) == EXIT_FAILED
    [record] = error_records(caplog)
    assert str(checkpoint) in record.getMessage() and "checksum mismatch" in record.getMessage()
    assert not (tmp_path / "out" / "x.tif").exists()


def test_missing_checkpoint_names_the_file(tmp_path, tiny_model_config, tiny_model, caplog, no_installed_weights):
    manifest = make_weights(tmp_path / "opt-ml-model", tiny_model_config, tiny_model)
    (manifest.parent / "general.safetensors").unlink()
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    assert run("folder", settings_for(tmp_path)) == EXIT_FAILED
    assert "general.safetensors: weights file is missing" in error_records(caplog)[0].getMessage()


def test_weights_order_explicit_then_model_dir_then_bundled(tmp_path, tiny_model_config, tiny_model,
                                                            no_installed_weights, monkeypatch):
    bundled = make_weights(tmp_path / "bundled", tiny_model_config, tiny_model)
    settings = settings_for(tmp_path, bundled_weights=bundled.parent)
    assert resolve_weights(settings) == bundled
    mounted = make_weights(tmp_path / "opt-ml-model" / "model", tiny_model_config, tiny_model)  # one folder down
    assert resolve_weights(settings) == mounted
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(bundled))
    assert resolve_weights(settings) == bundled
    settings.weights = tmp_path / "explicit.yaml"  # named but missing: said at once, never a fallback
    with pytest.raises(WeightsError, match="explicit.yaml: weights manifest not found"):
        resolve_weights(settings)


def test_model_tarball_is_extracted_to_scratch(tmp_path, tiny_model_config, tiny_model, no_installed_weights):
    weights = make_weights(tmp_path / "w", tiny_model_config, tiny_model).parent
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    with tarfile.open(model_dir / "model.tar.gz", "w:gz") as tar:
        for item in weights.iterdir():
            tar.add(item, arcname=item.name)
    settings = settings_for(tmp_path, scratch_dir=tmp_path / "scratch")
    settings.scratch_dir.mkdir()
    manifest = resolve_weights(settings)
    assert manifest.is_file() and manifest.is_relative_to(settings.scratch_dir)
    loaded = load_predictor(settings)
    assert loaded.weights_info["sha256"] == load_predictor(
        settings_for(tmp_path, weights=weights / "manifest.yaml")).weights_info["sha256"]


def test_model_tarball_without_a_writable_temporary_folder_is_one_weights_error(tmp_path, tiny_model_config,
                                                                                  tiny_model, monkeypatch):
    # docker run --read-only without --tmpfs /tmp: tempfile's FileNotFoundError named neither the
    # tarball nor the fix, and reached the user as "unexpected FileNotFoundError".
    import tempfile

    from lsmseg.weights import extract_model_tarball

    weights = make_weights(tmp_path / "w", tiny_model_config, tiny_model).parent
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in weights.iterdir():
            tar.add(item, arcname=item.name)

    def no_temporary_folder(*args, **kwargs):
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', '/']")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_folder)
    with pytest.raises(WeightsError, match=rf"^{tarball}: no writable temporary folder .*--tmpfs /tmp\) or set TMPDIR$"):
        extract_model_tarball(tarball)


def test_model_tarball_with_escaping_paths_is_refused(tmp_path, no_installed_weights):
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    (tmp_path / "evil.txt").write_text("x")
    with tarfile.open(model_dir / "model.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with pytest.raises(WeightsError, match="outside the archive"):
        resolve_weights(settings_for(tmp_path))


# ------------------------------------------------------------------------------ exec mode


def exec_input(tmp_path, name="case.tif", slug=DEFAULT_INPUT_SLUG, shape=(12, 40, 44)):
    folder = tmp_path / "in" / "images" / slug
    folder.mkdir(parents=True)
    image = volume(shape, seed=5)
    io.write_volume(image, folder / name, spacing=SPACING)
    return folder / name, image


def read_output_mha(tmp_path, slug=DEFAULT_OUTPUT_SLUG):
    folder = tmp_path / "out" / "images" / slug
    assert sorted(p.name for p in folder.iterdir()) == ["output.mha"], "only the mask in the socket folder"
    return sitk.ReadImage(str(folder / "output.mha"))


@pytest.mark.parametrize("name", ["case.tif", "case.tiff", "case.mha"])
def test_exec_mode_writes_output_mha_with_input_size_and_spacing(tmp_path, predictor, name):
    path, image = exec_input(tmp_path, name)
    assert auto_mode(tmp_path / "in") == "exec"
    assert run(None, settings_for(tmp_path), predictor=predictor) == EXIT_OK
    mask = read_output_mha(tmp_path)
    assert mask.GetSize() == image.shape[::-1]
    np.testing.assert_allclose(mask.GetSpacing(), SPACING[::-1], rtol=1e-5)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    assert (tmp_path / "provenance" / "output.mha.provenance.json").is_file()
    # compressed MHA: the pixel data are zlib-compressed
    assert b"CompressedData = True" in (tmp_path / "out/images" / DEFAULT_OUTPUT_SLUG / "output.mha").read_bytes()[:2000]


def test_exec_mode_configurable_and_2024_slugs(tmp_path, predictor):
    exec_input(tmp_path, slug="3d-brain-microscopy")  # the 2024 interface, found without configuration
    assert run("exec", settings_for(tmp_path), predictor=predictor) == EXIT_OK
    read_output_mha(tmp_path, "brain-structure")
    settings = settings_for(tmp_path, output_dir=tmp_path / "out2", input_slug="3d-brain-microscopy", output_slug="mask")
    assert run("exec", settings, predictor=predictor) == EXIT_OK
    assert (tmp_path / "out2/images/mask/output.mha").is_file()


@pytest.mark.parametrize("problem", ["no image", "two images", "no folder", "corrupt"])
def test_exec_mode_bad_case_is_one_line_and_exit_one(tmp_path, predictor, caplog, problem):
    folder = tmp_path / "in" / "images" / DEFAULT_INPUT_SLUG
    if problem != "no folder":
        folder.mkdir(parents=True)
    else:
        (tmp_path / "in" / "images").mkdir(parents=True)
    if problem == "two images":
        io.write_volume(volume(), folder / "a.tif")
        io.write_volume(volume(), folder / "b.mha")
    if problem == "corrupt":
        (folder / "a.mha").write_text("ObjectType = Image\nNDims = 3\nElementDataFile = LOCAL\n")
    assert run("exec", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert str(folder) in record.getMessage() and "\n" not in record.getMessage()
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").rglob("*.mha"))


def test_auto_mode_is_folder_without_images_folder(tmp_path):
    (tmp_path / "in").mkdir()
    assert auto_mode(tmp_path / "in") == "folder"


# ------------------------------------------------------------------------------ invoke case handling

SELMA3D_2026_INPUTS = [  # the layout of the organisers' test/input/interf0/inputs.json
    {
        "socket": {
            "slug": "light-sheet-3d-microscopy",
            "relative_path": "images/light-sheet-3d-microscopy",
            "is_image_kind": True,
            "is_panimg_kind": True,
            "is_dicom_image_kind": False,
            "is_json_kind": False,
            "is_file_kind": False,
            "is_json_file_kind": False,
        },
        "file": None,
        "image": {"name": "cell_nuclei_2301.mha"},
        "value": None,
    }
]


def test_invocation_reads_inputs_json_and_writes_output(tmp_path, predictor):
    path, image = exec_input(tmp_path, name="9a1b-uuid.mha")  # GC renames images; the name is informative
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(SELMA3D_2026_INPUTS))
    result = handle_invocation(predictor, settings_for(tmp_path))
    assert result["socket"] == "light-sheet-3d-microscopy" and result["image_name"] == "cell_nuclei_2301.mha"
    assert result["input"] == str(path)
    assert read_output_mha(tmp_path).GetSize() == image.shape[::-1]


def test_a_failed_invocation_leaves_no_earlier_case_mask(tmp_path, predictor):
    # The server outlives its cases: a case that failed (422) left the previous case's output.mha
    # where the platform collects this case's.
    exec_input(tmp_path, name="9a1b-uuid.mha")
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(SELMA3D_2026_INPUTS))
    handle_invocation(predictor, settings_for(tmp_path))
    read_output_mha(tmp_path)  # written
    (tmp_path / "in" / "inputs.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        handle_invocation(predictor, settings_for(tmp_path))
    assert not list((tmp_path / "out").rglob("*.mha"))


def test_an_invocation_never_removes_a_file_of_the_input(tmp_path, predictor):
    # The previous case's mask was removed before the paths were checked: with --output equal to
    # --input, a file of the input named like the mask was deleted, then the case refused.
    exec_input(tmp_path, name="9a1b-uuid.mha")
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(SELMA3D_2026_INPUTS))
    ours = tmp_path / "in" / "images" / DEFAULT_OUTPUT_SLUG / "output.mha"
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"an input file")
    with pytest.raises(OutputError, match="inside the input"):
        handle_invocation(predictor, settings_for(tmp_path, output_dir=tmp_path / "in"))
    assert ours.read_bytes() == b"an input file"


def test_invocation_post_processes_by_the_job_image_name(tmp_path, predictor):
    """The socket file is named by a UUID; the job's image name picks the structure's settings."""
    predictor.settings = dataclasses.replace(
        predictor.settings, per_structure={"cell_nuclei": {"threshold": 0.99, "min_component_voxels": 7}})
    exec_input(tmp_path, name="9a1b-uuid.mha")
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(SELMA3D_2026_INPUTS))
    handle_invocation(predictor, settings_for(tmp_path))
    record = json.loads(next((tmp_path / "provenance").glob("*.provenance.json")).read_text())
    assert record["postprocess"]["structure"] == "cell_nuclei"
    assert record["postprocess"]["threshold"] == 0.99 and record["postprocess"]["min_component_voxels"] == 7


def test_invocation_uses_the_only_image_socket_when_slug_differs(tmp_path, predictor):
    exec_input(tmp_path, slug="some-other-slug")
    inputs = json.loads(json.dumps(SELMA3D_2026_INPUTS))
    inputs[0]["socket"].update(slug="some-other-slug", relative_path="images/some-other-slug")
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(inputs))
    assert handle_invocation(predictor, settings_for(tmp_path))["socket"] == "some-other-slug"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing"),
        ("{not json", "not valid JSON"),
        ('{"socket": {}}', "expected a JSON list"),
        ('[{"socket": {"slug": "a", "is_image_kind": false}}]', "no input socket"),
        ('[{"socket": {"slug": "light-sheet-3d-microscopy", "relative_path": "../etc"}}]', "unsafe relative_path"),
        pytest.param("[" * 100_000 + "]" * 100_000, "not valid JSON", id="too deep"),  # bad input, not a 500
    ],
)
def test_bad_inputs_json(tmp_path, predictor, content, message):
    exec_input(tmp_path)
    if content is not None:
        (tmp_path / "in" / "inputs.json").write_text(content)
    with pytest.raises(InputError, match=message):
        handle_invocation(predictor, settings_for(tmp_path))


def test_inputs_json_linking_outside_the_input_is_not_read(tmp_path, predictor):
    exec_input(tmp_path)
    (tmp_path / "elsewhere.json").write_text(json.dumps(SELMA3D_2026_INPUTS))
    (tmp_path / "in" / "inputs.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(InputError, match="outside the input folder"):
        handle_invocation(predictor, settings_for(tmp_path))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ command line


def test_cli_challenge_folder_mode_with_env(tmp_path, tiny_model_config, tiny_model, monkeypatch, no_installed_weights):
    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.nii.gz", spacing=SPACING)
    monkeypatch.setenv("LSMSEG_INPUT", str(tmp_path / "in"))
    monkeypatch.setenv("LSMSEG_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(manifest))
    monkeypatch.setenv("LSMSEG_DEVICE", "cpu")
    monkeypatch.setenv("LSMSEG_ENGINE", "torch")
    assert main(["-q", "challenge"]) == 0
    assert (tmp_path / "out" / "x.nii.gz").is_file()
    record = json.loads((tmp_path / "out" / "x.nii.gz.provenance.json").read_text())
    assert record["parameters"]["engine"] == "torch"


def test_cli_bad_mode_or_port_is_a_usage_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LSMSEG_MODE", "batch")
    assert main(["challenge", "--input", str(tmp_path)]) == EXIT_USAGE
    assert main(["serve", "--port", "http"]) == EXIT_USAGE


@pytest.mark.parametrize("option", ["--input-slug", "--output-slug", "LSMSEG_OUTPUT_SLUG"])
@pytest.mark.parametrize("slug", ["/tmp/elsewhere", "../up", "a/b", "..", " "])
def test_cli_a_slug_that_is_not_one_folder_name_is_a_usage_error(tmp_path, monkeypatch, capsys, option, slug):
    """A slug is one folder name: '/abs' or '../x' would put the mask outside the output folder."""
    exec_input(tmp_path)
    args = ["challenge", "--mode", "exec", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    if option.startswith("--"):
        args += [option, slug]
    else:
        monkeypatch.setenv(option, slug)
    assert main(args) == EXIT_USAGE
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert "slug" in line and repr(slug) in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ links out of the input


@pytest.mark.parametrize("link", ["image", "socket folder", "socket folder of two images", "plane of a case folder"])
def test_exec_mode_refuses_a_case_image_that_links_outside_the_input(tmp_path, predictor, caplog, link):
    """Nothing outside /input is read: a case image (or socket folder, or a plane of a case image
    that is a plane folder) linking elsewhere is bad input; an outside socket folder is not listed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    io.write_volume(volume(), elsewhere / "secret.tif")
    images = tmp_path / "in" / "images"
    images.mkdir(parents=True)
    if link == "image":
        (images / DEFAULT_INPUT_SLUG).mkdir()
        (images / DEFAULT_INPUT_SLUG / "case.tif").symlink_to(elsewhere / "secret.tif")
    elif link == "plane of a case folder":
        planes = images / DEFAULT_INPUT_SLUG / "case.tif"
        planes.mkdir(parents=True)
        for z, plane in enumerate(volume()):
            tifffile.imwrite(elsewhere / f"z{z:03d}.tif", plane)
            (planes / f"z{z:03d}.tif").symlink_to(elsewhere / f"z{z:03d}.tif")
    else:
        if link == "socket folder of two images":
            io.write_volume(volume(), elsewhere / "other.tif")
        (images / DEFAULT_INPUT_SLUG).symlink_to(elsewhere)
    assert run("exec", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert "outside the input folder" in record.getMessage() and "\n" not in record.getMessage()
    assert not list((tmp_path / "out").rglob("*.mha"))


def test_exec_mode_refuses_an_output_folder_inside_the_input(tmp_path, predictor, caplog):
    """As folder mode does: the input is never written to, even with --output naming it."""
    exec_input(tmp_path)
    settings = settings_for(tmp_path, output_dir=tmp_path / "in")
    assert run("exec", settings, predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert "inside the input" in record.getMessage()
    assert not (tmp_path / "in" / "images" / DEFAULT_OUTPUT_SLUG).exists()


def test_exec_mode_accepts_a_link_that_stays_inside_the_input(tmp_path, predictor):
    exec_input(tmp_path, name="stored.tif", slug="store")
    folder = tmp_path / "in" / "images" / DEFAULT_INPUT_SLUG
    folder.mkdir()
    (folder / "case.tif").symlink_to(tmp_path / "in" / "images" / "store" / "stored.tif")
    assert run("exec", settings_for(tmp_path), predictor=predictor) == EXIT_OK
    read_output_mha(tmp_path)


def test_folder_mode_a_link_to_a_folder_holding_the_output_fails_alone(tmp_path, predictor, caplog):
    """`in/up -> ..` holds the output folder: that entry is refused as a link out of the input (one
    line), not taken for an input folder the output would be written into (the whole run refused)."""
    (tmp_path / "in").mkdir()
    io.write_volume(volume(), tmp_path / "in" / "x.tif")
    (tmp_path / "in" / "up").symlink_to("..")
    (tmp_path / "in" / "self").symlink_to(".")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    assert (tmp_path / "out" / "x.tif").is_file()
    itself_first = sorted((r.getMessage() for r in error_records(caplog)), key=lambda m: "/in/up:" in m)
    itself, up = itself_first
    assert up.startswith(str(tmp_path / "in" / "up")) and "outside the input folder" in up
    assert itself.startswith(str(tmp_path / "in" / "self")) and "back to the input folder itself" in itself
