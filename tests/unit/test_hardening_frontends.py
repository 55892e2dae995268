"""Front ends against hostile and careless inputs (issue 11): outputs never replace inputs, errors
stay one line, provenance records are not lost, weights stay confined, SIGTERM cleans up."""

import io as stdio
import json
import os
import shutil
import signal
import stat
import tarfile

import pytest
import tifffile
import torch
import yaml

from lsmseg import io, model
from lsmseg.challenge import folder as folder_mode
from lsmseg.challenge.runner import run, settings_from_args
from lsmseg.challenge.settings import DEFAULT_INPUT_SLUG, ChallengeSettings
from lsmseg.cli import main
from lsmseg.config import InferenceSettings
from lsmseg.errors import EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, ConfigError, OutputError, WeightsError
from lsmseg.inference import Predictor, RunOptions, predict_files
from lsmseg.inference import run as run_module
from lsmseg.weights import extract_model_tarball

from ..conftest import make_weights
from .test_challenge import error_records, settings_for, volume


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


# ------------------------------------------------------------------------------ one-line errors


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

    def terminated_while_writing(predictor, volumes, out_dir):
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
