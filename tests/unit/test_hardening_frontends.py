"""Front ends against hostile and careless inputs (issue 11): outputs never replace inputs, errors
stay one line, provenance records are not lost, weights stay confined, SIGTERM cleans up."""

import io as stdio
import json
import logging
import os
import shutil
import signal
import stat
import tarfile
import types
from pathlib import Path

import pytest
import tifffile
import torch
import yaml

from lsmseg import io, model
from lsmseg.challenge import folder as folder_mode
from lsmseg.challenge.runner import run, settings_from_args
from lsmseg.challenge.settings import DEFAULT_INPUT_SLUG, DEFAULT_OUTPUT_SLUG, ChallengeSettings
from lsmseg.cli import build_parser, main
from lsmseg.config import InferenceSettings
from lsmseg.errors import EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, ConfigError, OutputError, WeightsError
from lsmseg.inference import Predictor, RunOptions, predict_files
from lsmseg.inference import run as run_module
from lsmseg.weights import extract_model_tarball

from ..conftest import make_weights
from .test_challenge import error_records, exec_input, settings_for, volume


@pytest.fixture
def predictor(tiny_model, tiny_model_config):
    return Predictor(tiny_model, tiny_model_config, InferenceSettings(), device="cpu",
                     options=RunOptions(progress=False))


class Untouchable:
    """A predictor stand-in that fails the test if any volume work starts (any use of it)."""

    def __getattr__(self, name):
        raise AssertionError(f"work started ({name})")


# ------------------------------------------------------------------------------ outputs vs inputs


def test_predict_into_the_input_folder_is_refused_and_the_input_kept(tmp_path, predictor):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    before = image.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        predict_files(predictor, [image], tmp_path)
    assert image.read_bytes() == before


def test_cli_predict_into_the_input_folder_exits_one_with_one_line(tmp_path, tiny_weights, capsys):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "d" / "a.tif")
    before = image.read_bytes()
    assert main(["predict", str(image), "-o", str(tmp_path / "d"), "--weights", str(tiny_weights), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and "overwrite the input" in err[0]
    assert image.read_bytes() == before


def test_folder_mode_with_the_same_input_and_output_is_refused_before_loading(tmp_path, caplog):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "d" / "a.tif")
    before = image.read_bytes()
    settings = settings_for(tmp_path, input_dir=tmp_path / "d", output_dir=tmp_path / "d")
    assert run("folder", settings, predictor=Untouchable()) == EXIT_FAILED
    [record] = error_records(caplog)
    assert "overwrite the input" in record.getMessage()
    assert image.read_bytes() == before


def test_exec_mode_output_onto_its_input_is_refused(tmp_path, caplog):
    folder = tmp_path / "io" / "images" / "s"
    image = io.write_volume(volume((6, 24, 24)), folder / "output.mha")
    settings = settings_for(tmp_path, input_dir=tmp_path / "io", output_dir=tmp_path / "io", input_slug="s",
                            output_slug="s")
    assert run("exec", settings, predictor=Untouchable()) == EXIT_FAILED
    assert "overwrite the input" in error_records(caplog)[0].getMessage()
    assert image.is_file()


def with_probabilities(predictor, folder):
    """The same model, also writing probability maps to ``folder``."""
    return Predictor(predictor.model, predictor.model_config, predictor.settings, device="cpu",
                     options=RunOptions(progress=False, probabilities_dir=folder))


def test_probability_maps_onto_the_inputs_are_refused_before_any_work(tmp_path, predictor):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "c" / "x.tif")
    before = image.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        predict_files(with_probabilities(predictor, tmp_path / "c"), [image], tmp_path / "out")
    assert image.read_bytes() == before and not (tmp_path / "out").exists()


def test_probability_maps_into_the_mask_folder_are_refused_as_a_usage_error(tmp_path, predictor):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "x.tif")
    with pytest.raises(OutputError, match="into the masks' folder"):
        predict_files(with_probabilities(predictor, tmp_path / "out"), [image], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_volumes_whose_outputs_collide_are_refused_and_the_others_segmented(tmp_path, predictor, caplog):
    a = io.write_volume(volume((6, 24, 24), seed=1), tmp_path / "a" / "x.tif")
    b = io.write_volume(volume((6, 24, 24), seed=2), tmp_path / "b" / "X.tif")  # one file where case is ignored
    c = io.write_volume(volume((6, 24, 24), seed=3), tmp_path / "b" / "y.tif")
    results = predict_files(predictor, [a, b, c], tmp_path / "out")
    assert [r.ok for r in results] == [False, False, True]
    [record] = error_records(caplog)  # one line for the one problem, naming both inputs
    assert str(a) in record.getMessage() and str(b) in record.getMessage() and "none of them" in record.getMessage()
    assert results[0].error == results[1].error == record.getMessage()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y.tif", "y.tif.provenance.json"]


def test_cli_same_named_inputs_exit_one_and_write_neither(tmp_path, tiny_weights, capsys):
    a = io.write_volume(volume((6, 24, 24), seed=1), tmp_path / "a" / "x.tif")
    b = io.write_volume(volume((6, 24, 24), seed=2), tmp_path / "b" / "x.tif")
    assert main(["predict", str(a), str(b), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "-q"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ERROR: ") and str(a) in line and str(b) in line
    assert not (tmp_path / "out" / "x.tif").exists()


def test_a_folder_at_the_mask_path_is_kept_and_that_volume_fails(tmp_path, predictor, caplog):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a" / "x.tif")
    (tmp_path / "out" / "x.tif").mkdir(parents=True)
    (tmp_path / "out" / "x.tif" / "keep.txt").write_text("mine")
    [result] = predict_files(predictor, [image], tmp_path / "out")
    assert not result.ok and "already exists as a folder" in result.error
    assert (tmp_path / "out" / "x.tif" / "keep.txt").read_text() == "mine"
    assert len(error_records(caplog)) == 1


def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path, predictor, caplog):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a" / "x.tif")
    with pytest.raises(OutputError, match="inside the input"):
        predict_files(predictor, [image], tmp_path / "a" / "sub", input_folders=[tmp_path / "a"])
    settings = settings_for(tmp_path, input_dir=tmp_path / "a", output_dir=tmp_path / "a" / "out")
    assert run("folder", settings, predictor=Untouchable()) == EXIT_FAILED
    assert "inside the input" in error_records(caplog)[-1].getMessage()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.tif"]
    # A file named on its own may have its mask in a folder beside it.
    [result] = predict_files(predictor, [image], tmp_path / "a" / "sub")
    assert result.ok


def test_cli_folder_arguments_guard_their_outputs_and_links(tmp_path, tiny_weights, capsys):
    # predict's folder arguments reach the checks: no output inside one, no link out of one.
    io.write_volume(volume((6, 24, 24), seed=1), tmp_path / "a" / "x.tif")
    weights = ["--weights", str(tiny_weights), "-q"]
    assert main(["predict", str(tmp_path / "a"), "-o", str(tmp_path / "a" / "sub"), *weights]) == EXIT_FAILED
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ERROR: ") and "inside the input" in line
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.tif"]
    elsewhere = io.write_volume(volume((6, 24, 24), seed=2), tmp_path / "elsewhere" / "linked.tif")
    os.symlink(elsewhere, tmp_path / "a" / "link.tif")
    assert main(["predict", str(tmp_path / "a"), "-o", str(tmp_path / "out"), *weights]) == EXIT_FAILED
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "link.tif" in line and "outside the input folder" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.tif", "x.tif.provenance.json"]
    # Probability maps into the masks' own folder: a usage error, before anything is loaded.
    assert main(["predict", str(tmp_path / "a" / "x.tif"), "-o", str(tmp_path / "o2"), "--save-probabilities",
                 str(tmp_path / "o2"), *weights]) == EXIT_USAGE
    assert not (tmp_path / "o2").exists()


def test_links_out_of_the_input_folder_are_refused_and_the_others_segmented(tmp_path, predictor, caplog):
    elsewhere = io.write_volume(volume((6, 24, 24), seed=1), tmp_path / "elsewhere" / "linked.tif")
    io.write_volume(volume((6, 24, 24), seed=2), tmp_path / "in" / "good.tif")
    os.symlink(elsewhere, tmp_path / "in" / "link.tif")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    message = record.getMessage()
    assert message.startswith(str(tmp_path / "in" / "link.tif")) and "outside the input folder" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.tif", "good.tif.provenance.json"]
    # A link named on its own is the user's choice.
    [result] = predict_files(predictor, [tmp_path / "in" / "link.tif"], tmp_path / "out2")
    assert result.ok


# ------------------------------------------------------------------------------ one-line errors


def test_a_file_name_with_a_newline_gives_one_error_line(tmp_path, predictor, caplog):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad\nERROR: fake.tif").write_bytes(b"II*\x00" + b"\x13" * 100)
    io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "good.tif")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert "\n" not in record.getMessage() and "bad\\nERROR: fake.tif" in record.getMessage()


def test_corrupt_strip_in_exec_mode_is_one_line(tmp_path, predictor, caplog):
    folder = tmp_path / "in" / "images" / DEFAULT_INPUT_SLUG
    folder.mkdir(parents=True)
    path = folder / "case.tif"
    tifffile.imwrite(path, volume((16, 64, 64)), compression="zlib", imagej=True, metadata={"axes": "ZYX"})
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[9].dataoffsets[0]
    raw[offset: offset + 64] = b"\x13" * 64
    path.write_bytes(bytes(raw))
    assert run("exec", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    [record] = error_records(caplog)
    assert str(path) in record.getMessage() and "\n" not in record.getMessage() and record.exc_info is None
    assert not any((tmp_path / "out").rglob("*.mha")) and not any((tmp_path / "out").rglob(".partial-*"))


def test_manifest_with_zero_heads_is_a_weights_error(tmp_path, tiny_model_config, tiny_model):
    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    data = yaml.safe_load(manifest.read_text())
    data["models"]["general"]["model"]["num_heads"] = [0] * len(data["models"]["general"]["model"]["num_heads"])
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightsError, match="cannot be built"):
        Predictor.from_manifest(manifest, device="cpu")


def test_cuda_device_without_a_gpu_is_a_config_error(monkeypatch, tmp_path, tiny_weights, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        model.select_device("cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        model.select_device("gpu7")
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    assert main(["predict", str(image), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                 "--device", "cuda", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


@pytest.mark.parametrize("device", ["cuda:x", "mps", "gpu", "cuda:"])
def test_misspelt_device_is_a_usage_error_in_every_front_end(device, monkeypatch, tmp_path, tiny_weights, capsys):
    # A name lsmseg never runs on is a usage error (exit 2) before the weights load; it was a
    # ConfigError after they loaded (exit 1), like a GPU that is not there.
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(image), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device", device])
    assert stop.value.code == 2 and "expected cpu, cuda or cuda:N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["challenge", "--input", str(tmp_path), "--device", device])
    assert stop.value.code == 2
    monkeypatch.setenv("LSMSEG_DEVICE", device)
    assert main(["challenge", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert f"LSMSEG_DEVICE: expected cpu, cuda or cuda:N (N a GPU index), got '{device}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_device_names_torch_accepts_pass_the_parser():
    from lsmseg import argtypes

    assert [argtypes.device(name) for name in ("cpu", "cpu:0", "cuda", "cuda:1", " cuda:0 ")] == [
        "cpu", "cpu:0", "cuda", "cuda:1", "cuda:0"]


# ------------------------------------------------------------------------------ size limits in the front ends


def test_max_voxels_reaches_the_predictor_and_the_challenge_settings(tmp_path, tiny_weights, monkeypatch, capsys):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")
    assert main(["predict", str(image), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                 "--max-voxels", "1000", "-q"]) == 1
    assert "above the limit of 1,000" in capsys.readouterr().err and not (tmp_path / "out" / "a.tif").exists()
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("LSMSEG_PROGRESS", "0")
    assert main(["challenge", "--mode", "folder", "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out2"), "--max-voxels", "1000"]) == 1
    assert "above the limit of 1,000" in capsys.readouterr().err


def test_not_enough_disk_for_the_mask_is_refused_before_predicting(tmp_path, predictor, monkeypatch):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    [result] = predict_files(predictor, [image], tmp_path / "out")
    assert not result.ok and "not enough free disk space" in result.error
    assert not (tmp_path / "out" / "a.tif").exists()


def test_resampling_to_a_huge_grid_is_refused(tmp_path, tiny_model, tiny_model_config):
    settings = InferenceSettings(spacing=(1.0, 1.0, 1.0))
    predictor = Predictor(tiny_model, tiny_model_config, settings, device="cpu",
                          options=RunOptions(progress=False, max_voxels=10**6))
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif", spacing=(100.0, 100.0, 100.0))
    [result] = predict_files(predictor, [image], tmp_path / "out")
    assert not result.ok and "resampled volume declares" in result.error


# ------------------------------------------------------------------------------ provenance


def test_provenance_records_of_same_named_outputs_do_not_collide(tmp_path, predictor):
    names = ["a.tif", "a.tiff", "a.nii.gz"]
    inputs = [io.write_volume(volume((6, 24, 24), seed=i), tmp_path / "in" / n) for i, n in enumerate(names)]
    results = predict_files(predictor, inputs, tmp_path / "out")
    assert all(r.ok for r in results)
    for name in names:
        record = json.loads((tmp_path / "out" / f"{name}.provenance.json").read_text())
        assert record["output"] == str(tmp_path / "out" / name)


def test_provenance_failure_is_not_reported_as_a_missing_mask(tmp_path, predictor, monkeypatch, caplog):
    io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")

    def failing_write_json(data, path):
        raise OutputError(path, "cannot write: disk quota exceeded")

    monkeypatch.setattr(run_module, "write_json", failing_write_json)
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_FAILED
    assert (tmp_path / "out" / "a.tif").is_file()
    [record] = error_records(caplog)
    assert "was written" in record.getMessage() and "provenance" in record.getMessage()
    assert "no mask was written" not in caplog.text and "without their provenance" in caplog.text


def test_exec_mode_provenance_failure_is_a_warning_and_the_job_succeeds(tmp_path, predictor, caplog):
    exec_input(tmp_path)
    (tmp_path / "blocked").write_text("a file where the provenance folder should be")
    settings = settings_for(tmp_path, provenance_dir=tmp_path / "blocked")
    assert run("exec", settings, predictor=predictor) == EXIT_OK
    assert (tmp_path / "out" / "images" / DEFAULT_OUTPUT_SLUG / "output.mha").is_file()
    assert not error_records(caplog)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "provenance record is missing" in warning.getMessage()


def test_exec_mode_provenance_goes_to_a_private_folder_not_a_shared_fixed_one(tmp_path, predictor):
    exec_input(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "lsmseg-provenance").write_text("another run's (or user's) file at the old fixed name")
    settings = settings_for(tmp_path, provenance_dir=None, scratch_dir=scratch)
    assert run("exec", settings, predictor=predictor) == EXIT_OK
    [record] = scratch.glob("lsmseg-provenance-*/output.mha.provenance.json")
    assert oct(record.parent.stat().st_mode & 0o777) == oct(0o700)
    assert run("exec", settings, predictor=predictor) == EXIT_OK  # one folder per process
    assert len(list(scratch.glob("lsmseg-provenance-*"))) == 1


# ------------------------------------------------------------------------------ weights


def test_manifest_cannot_point_outside_its_folder(tmp_path, tiny_model_config, tiny_model):
    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    (tmp_path / "w" / "general.safetensors").rename(tmp_path / "elsewhere.safetensors")
    data = yaml.safe_load(manifest.read_text())
    for name in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        data["models"]["general"]["file"] = name
        manifest.write_text(yaml.safe_dump(data))
        with pytest.raises(WeightsError, match="outside the manifest's folder"):
            Predictor.from_manifest(manifest, device="cpu")


def test_upper_case_sha256_is_accepted(tmp_path, tiny_model_config, tiny_model):
    manifest = make_weights(tmp_path / "w", tiny_model_config, tiny_model)
    data = yaml.safe_load(manifest.read_text())
    data["models"]["general"]["sha256"] = data["models"]["general"]["sha256"].upper()
    manifest.write_text(yaml.safe_dump(data))
    assert Predictor.from_manifest(manifest, device="cpu").weights_info["model"] == "general"


@pytest.mark.parametrize("python_has_data_filter", [True, False])
def test_tarball_modes_are_sanitised_and_scratch_removed_on_failure(tmp_path, tiny_model_config, tiny_model,
                                                                     python_has_data_filter, monkeypatch):
    if not python_has_data_filter:  # as on Debian bookworm's Python 3.11.2, which the image runs
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    source = make_weights(tmp_path / "w", tiny_model_config, tiny_model).parent
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in source.iterdir():
            info = tar.gettarinfo(item, arcname=item.name)
            info.mode = 0o6777  # setuid, setgid, world-writable
            with open(item, "rb") as handle:
                tar.addfile(info, handle)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    manifest = extract_model_tarball(tarball, scratch)
    for item in manifest.parent.iterdir():
        mode = item.stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), (item, oct(mode))
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, stdio.BytesIO(b""))
    before = set(scratch.iterdir())
    with pytest.raises(WeightsError, match="holds no manifest"):
        extract_model_tarball(empty, scratch)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot extract"):
        extract_model_tarball(truncated, scratch)
    assert set(scratch.iterdir()) == before, "no half-extracted model left behind"


# ------------------------------------------------------------------------------ interrupted runs


def test_stale_partials_are_swept_at_the_start_of_folder_mode(tmp_path, predictor):
    io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".partial-999999999-0123abcd-a.tif"
    stale.write_bytes(b"half a mask")
    assert run("folder", settings_for(tmp_path), predictor=predictor) == EXIT_OK
    assert not stale.exists() and (tmp_path / "out" / "a.tif").is_file()


def test_sigterm_in_folder_mode_removes_the_partial_output(tmp_path, caplog, monkeypatch):
    io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")
    seen = {}

    def terminated_while_writing(predictor, volumes, out_dir, **options):
        with io.atomic_output(out_dir / "a.tif") as tmp:
            tmp.write_bytes(b"half a mask")
            seen["tmp"] = tmp
            os.kill(os.getpid(), signal.SIGTERM)  # docker stop, mid-write
            raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(folder_mode, "predict_files", terminated_while_writing)
    previous = signal.getsignal(signal.SIGTERM)
    code = run("folder", settings_for(tmp_path), predictor=object())
    assert code == EXIT_TERMINATED == 128 + signal.SIGTERM
    assert not seen["tmp"].exists() and not (tmp_path / "out" / "a.tif").exists()
    assert "terminated" in error_records(caplog)[0].getMessage()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored


def test_challenge_host_defaults_to_loopback(monkeypatch):
    from lsmseg.cli import build_parser

    monkeypatch.delenv("LSMSEG_HOST", raising=False)
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).host == "127.0.0.1"
    assert ChallengeSettings().host == "127.0.0.1"
    monkeypatch.setenv("LSMSEG_HOST", "0.0.0.0")
    assert settings_from_args(build_parser().parse_args(["serve"])).host == "0.0.0.0"


# ------------------------------------------------------------------------------ option values


def _usage_error_line(capsys) -> str:
    """The last stderr line after a refused command, checked to come with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, option", [
    (["predict", "a.tif", "-o", "out", "--overlap", "1.5"], "--overlap"),
    (["predict", "a.tif", "-o", "out", "--batch-size", "0"], "--batch-size"),
    (["predict", "a.tif", "-o", "out", "--min-component-voxels", "-5"], "--min-component-voxels"),
    (["predict", "a.tif", "-o", "out", "--max-voxels", "-1"], "--max-voxels"),
    (["predict", "a.tif", "-o", "out", "--workers", "0"], "--workers"),
    (["predict", "a.tif", "-o", "out", "--structure", "bogus"], "--structure"),
    (["predict", "a.tif", "-o", "out", "--structure", "microgila"], "--structure"),
    (["challenge", "--input", "missing", "--max-voxels", "inf"], "--max-voxels"),
    (["challenge", "--input", "missing", "--max-voxels", "nan"], "--max-voxels"),
    (["challenge", "--input", "missing", "--structure", "bogus"], "--structure"),
])
def test_bad_option_values_are_usage_errors_when_parsed(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    line = _usage_error_line(capsys)
    assert "error: argument" in line and option in line


def test_an_unknown_structure_is_refused_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "a.tif", "-o", "out", "--structure", "vesels"])
    line = _usage_error_line(capsys)
    assert "'vesels'" in line and "blood_vessel" in line and "vessels" in line


def test_predict_and_challenge_check_their_shared_options_alike():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    predict = {a.dest: a for a in commands["predict"]._actions}
    for command in ("challenge", "serve"):
        for action in commands[command]._actions:
            if action.dest in predict and action.dest not in ("help", "verbose", "quiet"):
                assert (action.type, action.choices) == (predict[action.dest].type, predict[action.dest].choices), (
                    command, action.dest)
    # A structure's per-structure settings otherwise come from each file name.
    assert "prefix" in predict["structure"].help


@pytest.mark.parametrize("variable, value", [("LSMSEG_ENGINE", "bogus"), ("LSMSEG_STRUCTURE", "microgila"),
                                             ("LSMSEG_MIRROR_AXES", "q"),
                                             ("LSMSEG_PROGRESS", "yes")])  # it silently meant no bars
def test_bad_environment_values_are_usage_errors_naming_the_variable(variable, value, tmp_path, tiny_weights,
                                                                     monkeypatch, capsys):
    io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")  # something to load the model for
    monkeypatch.setenv("LSMSEG_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("LSMSEG_DEVICE", "cpu")
    monkeypatch.setenv(variable, value)
    code = main(["challenge", "--mode", "folder", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ERROR: {variable}: ") and repr(value) in line
    assert not (tmp_path / "out").exists()


def test_options_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("LSMSEG_ENGINE", "bogus")
    monkeypatch.setenv("LSMSEG_MIRROR_AXES", "all")
    settings = settings_from_args(build_parser().parse_args(["challenge", "--engine", "torch", "--mirror-axes", "none"]))
    assert settings.engine == "torch" and settings.mirror_axes == ()
    monkeypatch.delenv("LSMSEG_ENGINE")
    monkeypatch.setenv("LSMSEG_STRUCTURE", "vessels")
    settings = settings_from_args(build_parser().parse_args(["challenge"]))
    assert (settings.engine, settings.structure, settings.mirror_axes) == ("auto", "vessels", (0, 1, 2))


def test_a_setting_the_core_refuses_is_a_usage_error_but_processing_errors_are_not(tmp_path, tiny_weights,
                                                                                     monkeypatch, capsys):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    argv = ["predict", str(image), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    # Exported engines run in fp32 only: a ValueError while the predictor is set up from the options.
    assert main([*argv, "--engine", "onnxruntime", "--precision", "fp16"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and "fp32" in err[0]

    import lsmseg.inference

    def bug(*args, **kwargs):
        raise ValueError("a bug while processing")

    monkeypatch.setattr(lsmseg.inference, "predict_files", bug)
    with pytest.raises(ValueError, match="a bug while processing"):
        main([*argv, "--engine", "torch"])


@pytest.mark.parametrize("extra, needed", [
    (["--probability-dtype", "float16"], "--save-probabilities"),
    (["--address", "tcp://127.0.0.1:8786"], "--scheduler dask"),
    (["--workers", "2"], "--scheduler dask"),
])
def test_options_that_need_another_are_refused_not_ignored(extra, needed, tmp_path, capsys):
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    assert main(["predict", str(image), "-o", str(tmp_path / "out"), *extra]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and extra[0] in err[0] and needed in err[0]


class _Terminal(stdio.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal, setting, quiet, progress", [
    (False, None, False, False), (True, None, False, True), (True, None, True, False),  # a log file: no bars
    (False, "1", False, True), (True, "0", False, False), (True, "1", True, False),  # LSMSEG_PROGRESS; -q wins
])
def test_predict_draws_progress_bars_only_on_a_terminal(terminal, setting, quiet, progress, tmp_path, monkeypatch):
    import lsmseg.inference

    monkeypatch.delenv("LSMSEG_PROGRESS", raising=False)
    if setting is not None:
        monkeypatch.setenv("LSMSEG_PROGRESS", setting)
    seen = {}

    def from_manifest(manifest, **kwargs):
        seen["progress"] = kwargs["options"].progress
        return types.SimpleNamespace(engine="torch", device=torch.device("cpu"))  # what the CLI reads of it

    monkeypatch.setattr(lsmseg.inference.Predictor, "from_manifest", from_manifest)
    monkeypatch.setattr(lsmseg.inference, "predict_files", lambda *args, **kwargs: [])
    if terminal:
        monkeypatch.setattr("sys.stderr", _Terminal())
    image = io.write_volume(volume((6, 24, 24)), tmp_path / "a.tif")
    assert main(["predict", str(image), "-o", str(tmp_path / "out"), *(["-q"] if quiet else [])]) == EXIT_OK
    assert seen["progress"] is progress


def test_inference_module_has_a_parser_and_one_line_errors(tmp_path, capsys):
    from lsmseg.inference.__main__ import main as export_main

    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0 and "MANIFEST" in capsys.readouterr().out
    assert export_main([str(tmp_path / "missing")]) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and "missing" in err[0]


def test_check_targets_refuses_a_link_out_alone_even_one_holding_the_output(tmp_path):
    """`predict in -o out` with `in/up -> ..` (which holds `out`): that entry fails alone as a link out
    of the input, instead of the whole run being refused as writing inside an input."""
    from lsmseg.errors import InputError
    from lsmseg.inference.run import check_targets

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.tif").write_bytes(b"")
    (tmp_path / "in" / "up").symlink_to("..")
    (tmp_path / "in" / "self").symlink_to(".")
    inputs = [tmp_path / "in" / name for name in ("x.tif", "up", "self")]
    refused = check_targets(inputs, [tmp_path / "out" / p.name for p in inputs], input_folders=[tmp_path / "in"])
    assert sorted(refused) == [1, 2] and all(isinstance(e, InputError) for e in refused.values())
    assert "outside the input folder" in str(refused[1]) and "back to the input folder itself" in str(refused[2])


def test_a_probability_map_failing_at_its_end_leaves_no_mask(tmp_path, predictor, monkeypatch):
    """The map is completed before the mask is renamed into place: when it fails at the end (a full disk
    at its last plane or rename), the volume fails with neither file, not with a mask and no provenance."""
    from lsmseg.inference import probabilities as probability_module

    real = probability_module.write_mask_blocks

    def fails_at_the_end(blocks, path, *args, **kwargs):
        real(blocks, path, *args, **kwargs)
        path.unlink()
        raise OutputError(path, "disk full")

    monkeypatch.setattr(probability_module, "write_mask_blocks", fails_at_the_end)
    good = io.write_volume(volume((6, 24, 24)), tmp_path / "in" / "a.tif")
    [result] = predict_files(with_probabilities(predictor, tmp_path / "p"), [good], tmp_path / "out")
    assert not result.ok and "disk full" in result.error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == []


@pytest.mark.parametrize("name", ["a.tif", "a.mhd"])
def test_a_mask_failing_after_its_probability_map_removes_the_map(tmp_path, predictor, monkeypatch, name):
    """...with a detached header's data file too (a.zraw of a.mhd)."""
    from lsmseg.inference import run as run_module

    real = run_module.write_mask_blocks

    def mask_fails_at_the_end(blocks, path, *args, **kwargs):
        real(blocks, path, *args, **kwargs)
        Path(path).unlink()
        raise OutputError(path, "cannot rename")

    monkeypatch.setattr(run_module, "write_mask_blocks", mask_fails_at_the_end)
    good = io.write_volume(volume((6, 24, 24)), tmp_path / "in" / name)
    [result] = predict_files(with_probabilities(predictor, tmp_path / "p"), [good], tmp_path / "out")
    assert not result.ok and "cannot rename" in result.error
    assert list((tmp_path / "p").iterdir()) == []
