"""What a new user meets first (issue 14): progress inside a volume, probability maps, inputs checked
before the weights load, phantoms in any format with a spacing, defaults shown in --help."""

import json
import re

import numpy as np
import pytest

from lsmseg import io

from ..conftest import make_weights
from ..conftest import run_lsmseg as lsmseg



@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_config, tiny_model):
    return make_weights(tmp_path_factory.mktemp("w"), tiny_model_config, tiny_model)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from lsmseg.synth.phantom import write_phantom

    image, _ = write_phantom(tmp_path_factory.mktemp("data"), "vessels", (24, 80, 80), 5)
    return image


def test_progress_counts_windows_within_one_volume_and_quiet_silences_it(tmp_path, weights, volume):
    # stderr is a pipe here, where bars are off by default (log files); LSMSEG_PROGRESS=1 asks for them.
    shown = lsmseg("predict", volume, "-o", tmp_path / "a", "--weights", weights, env={"LSMSEG_PROGRESS": "1"})
    assert shown.returncode == 0, shown.stderr
    counts = re.findall(r"vessels_5:\s+\d+%\|.*?\| (\d+)/(\d+) \[", shown.stderr)
    assert counts and counts[-1][0] == counts[-1][1]  # one volume, a bar that reaches its window total
    total = json.loads((tmp_path / "a" / "vessels_5.tif.provenance.json").read_text())["blocks"]["windows"]
    assert int(counts[-1][1]) >= total > 1
    quiet = lsmseg("predict", volume, "-o", tmp_path / "b", "--weights", weights, "-q", env={"LSMSEG_PROGRESS": "1"})
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("name, dtype, stored", [("x.tif", "uint8", "uint8"), ("x.tif", "float16", "float16"),
                                                 ("x.nii.gz", "float16", "float32"), ("x.mha", "uint8", "uint8")])
def test_save_probabilities_beside_the_masks(tmp_path, weights, volume, name, dtype, stored):
    source = io.read_volume(volume)
    io.write_volume(source.load(), tmp_path / name, spacing=source.spacing)
    result = lsmseg("predict", tmp_path / name, "-o", tmp_path / "masks", "--weights", weights, "-q",
                    "--save-probabilities", tmp_path / "prob", "--probability-dtype", dtype)
    assert result.returncode == 0, result.stderr
    mask = io.read_volume(tmp_path / "masks" / name)
    prob = io.read_volume(tmp_path / "prob" / name)
    assert prob.shape == mask.shape and prob.dtype == np.dtype(stored)
    assert prob.spacing == pytest.approx(mask.spacing)
    p = prob.load().astype(np.float32) / (255.0 if stored == "uint8" else 1.0)
    assert 0.0 <= p.min() and p.max() <= 1.0
    # the test weights' threshold is 0.5 and keep every component: the mask is p >= 0.5 (up to rounding)
    agree = ((p >= 0.5) == (mask.load() > 0)).mean()
    assert agree > 0.99
    record = json.loads((tmp_path / "masks" / f"{name}.provenance.json").read_text())
    assert record["probabilities"]["dtype"] == stored


def test_missing_input_fails_before_the_weights_load(tmp_path):
    # the weights do not exist either: the input is named first and alone, the weights never looked at
    result = lsmseg("predict", tmp_path / "typo.tif", "-o", tmp_path / "out", "--weights", tmp_path / "none.yaml")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"ERROR: {tmp_path / 'typo.tif'}: no such file or folder"]


def test_missing_input_among_good_ones_is_one_error_and_the_rest_run(tmp_path, weights, volume):
    result = lsmseg("predict", tmp_path / "typo.tif", volume, "-o", tmp_path / "out", "--weights", weights, "-q")
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("ERROR")] == [
        f"ERROR: {tmp_path / 'typo.tif'}: no such file or folder"]
    assert (tmp_path / "out" / volume.name).is_file()


def test_phantom_help_shows_defaults():
    text = lsmseg("phantom", "--help").stdout
    for default in ("(default: vessels)", "(default: 48,160,160)", "(default: 3,1,1)", "(default: 0)"):
        assert default in " ".join(text.split()), default


@pytest.mark.parametrize("name", ["demo.nii.gz", "demo.mha", "demo.tif"])
def test_phantom_format_from_the_name_and_spacing(tmp_path, name):
    result = lsmseg("phantom", tmp_path / name, "--kind", "nuclei", "--shape", "12,40,48", "--spacing", "2,0.5,0.5")
    assert result.returncode == 0, result.stderr
    image, label = io.read_volume(tmp_path / "images" / name), io.read_volume(tmp_path / "labels" / name)
    assert image.shape == label.shape == (12, 40, 48)
    assert image.spacing == pytest.approx((2.0, 0.5, 0.5)) and label.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert image.dtype == np.uint16 and set(np.unique(label.load())) <= {0, 1}


def test_predict_help_says_per_structure_defaults_and_that_an_option_overrides_them():
    # An explicit --threshold replaces every structure's own (Predictor.from_manifest); help said only "the manifest's".
    from lsmseg.cli import build_parser

    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    helps = {a.dest: " ".join(a.help.split()) for a in predict._actions if a.help}
    assert "per structure; a value given here applies to every structure" in helps["threshold"]
    assert "default: the manifest's, per structure" in helps["min_component_voxels"]
