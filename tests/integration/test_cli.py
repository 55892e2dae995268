"""The command line as a user runs it: real subprocesses, real files."""

import json

import numpy as np
import pytest

from lsmseg import io

from ..conftest import make_weights
from ..conftest import run_lsmseg as lsmseg



@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_config, tiny_model):
    return make_weights(tmp_path_factory.mktemp("w"), tiny_model_config, tiny_model)


def test_help_lists_commands():
    result = lsmseg("--help")
    assert result.returncode == 0
    for command in ("predict", "phantom"):
        assert command in result.stdout
    assert "--mask-value" in lsmseg("predict", "--help").stdout


def test_phantom_then_predict_with_a_bad_file_among_good_ones(tmp_path, weights):
    made = lsmseg("phantom", tmp_path / "data", "--kind", "cells", "--shape", "24,64,64", "--seed", "3")
    assert made.returncode == 0, made.stderr
    images = tmp_path / "data" / "images"
    (images / "broken.tif").write_bytes(b"II*\x00not really a tiff")
    result = lsmseg("predict", images, "-o", tmp_path / "out", "--weights", weights, "--mask-value", "255", "-q")
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error_lines) == 1 and "broken.tif" in error_lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cells_3.tif", "cells_3.tif.provenance.json"]
    mask = io.read_volume(tmp_path / "out" / "cells_3.tif")
    assert mask.shape == (24, 64, 64) and set(np.unique(mask.load())) <= {0, 255}
    provenance = json.loads((tmp_path / "out" / "cells_3.tif.provenance.json").read_text())
    assert provenance["weights"]["sha256"] and provenance["parameters"]["mask_value"] == 255


def test_no_weights_is_one_clear_line(tmp_path):
    result = lsmseg("predict", tmp_path, "-o", tmp_path / "out", "--weights", tmp_path / "nothing.yaml")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"ERROR: {tmp_path / 'nothing.yaml'}: weights manifest not found"]


def test_tampered_weights_refuse_to_run(tmp_path, weights):
    copy = make_weights(tmp_path / "w", *_config_and_model(weights))
    checkpoint = copy.parent / "general.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    result = lsmseg("predict", tmp_path, "-o", tmp_path / "out", "--weights", copy)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr and "general.safetensors" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_tarball_leaves_no_copy_in_the_temporary_folder(tmp_path, weights):
    """`--weights model.tar.gz` extracts the model into scratch space; the run removes it at exit."""
    import tarfile

    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in weights.parent.iterdir():
            tar.add(item, arcname=f"model/{item.name}")
    made = lsmseg("phantom", tmp_path / "data", "--kind", "cells", "--shape", "16,48,48", "--seed", "1")
    assert made.returncode == 0, made.stderr
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = lsmseg("predict", tmp_path / "data" / "images", "-o", tmp_path / "out", "--weights", tarball, "-q",
                    env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "cells_1.tif").is_file()  # the extracted model ran
    # The provenance names the tarball: the scratch manifest it also names is gone after the run.
    provenance = json.loads((tmp_path / "out" / "cells_1.tif.provenance.json").read_text())
    assert provenance["weights"]["tarball"] == str(tarball)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("lsmseg-model-")] == []


def _config_and_model(manifest_path):
    from lsmseg.weights import load_manifest, load_model

    manifest = load_manifest(manifest_path)
    entry = manifest.models["general"]
    return entry.model, load_model(manifest, entry)


def test_empty_input_folder_is_not_an_error(tmp_path, weights):
    (tmp_path / "in").mkdir()
    result = lsmseg("predict", tmp_path / "in", "-o", tmp_path / "out", "--weights", weights)
    assert result.returncode == 0 and "no volumes found" in result.stderr


def _masks_by_option(tmp_path, weights, option, values, threshold, recorded=float):
    """Predict one cells phantom once per value of ``option``: its masks by value (each checked to
    be recorded in the provenance's postprocess as ``recorded(value)``) and the images folder."""
    made = lsmseg("phantom", tmp_path / "data", "--kind", "cells", "--shape", "24,64,64", "--seed", "4")
    assert made.returncode == 0, made.stderr
    images = tmp_path / "data" / "images"
    masks = {}
    for value in values:
        out = tmp_path / f"out{value}"
        result = lsmseg("predict", images, "-o", out, "--weights", weights, "--threshold", threshold,
                        f"--{option.replace('_', '-')}", value, "-q")
        assert result.returncode == 0, result.stderr
        masks[value] = io.read_volume(out / "cells_4.tif").load()
        provenance = json.loads((out / "cells_4.tif.provenance.json").read_text())
        assert provenance["postprocess"][option] == recorded(value)
    return masks, images


def test_intensity_floor_option_reaches_the_masks_and_is_checked(tmp_path, weights):
    masks, images = _masks_by_option(tmp_path, weights, "intensity_floor", ("0", "1.5"), "0.01")
    # Floor 0 keeps every voxel above the threshold (normalised intensity is >= 0); floor 1.5 a
    # subset: voxels at least e^0.5 = 1.65 times the 99.5th percentile's distance from the 0.5th.
    plain, floored = masks["0"] > 0, masks["1.5"] > 0
    assert plain.sum() > floored.sum() and not (floored & ~plain).any()
    refused = lsmseg("predict", images, "-o", tmp_path / "x", "--weights", weights, "--intensity-floor", "-1")
    assert refused.returncode == 2 and "expected a finite value >= 0" in refused.stderr


def test_input_scale_option_overrides_every_structure_and_is_checked(tmp_path, weights):
    """--input-scale 1 predicts a structure the manifest rescales on its own grid (a whole-brain
    volume need not be held in memory at 3.4x); a scale outside the allowed range is one usage line."""
    masks, images = _masks_by_option(tmp_path, weights, "input_scale", ("1", "1.5"), "0.3")
    assert masks["1"].shape == masks["1.5"].shape == (24, 64, 64)
    assert not np.array_equal(masks["1"], masks["1.5"])
    refused = lsmseg("predict", images, "-o", tmp_path / "x", "--weights", weights, "--input-scale", "9")
    assert refused.returncode == 2 and "argument --input-scale: input scale 9 must lie within 0.25-4" in refused.stderr


def test_input_scale_option_takes_one_factor_per_axis(tmp_path, weights):
    """--input-scale Z,Y,X rescales each axis by its own factor (recorded as a list); 1,1,1 is the
    volume's own grid, the same mask as 1; a factor outside the allowed range is one usage line."""
    recorded = {"1": 1.0, "1,1,1": 1.0, "1.5,1,1": [1.5, 1.0, 1.0], "1.5": 1.5}
    masks, images = _masks_by_option(tmp_path, weights, "input_scale", tuple(recorded), "0.3", recorded.get)
    np.testing.assert_array_equal(masks["1,1,1"], masks["1"])
    assert masks["1.5,1,1"].shape == (24, 64, 64)
    assert not np.array_equal(masks["1.5,1,1"], masks["1"]) and not np.array_equal(masks["1.5,1,1"], masks["1.5"])
    refused = lsmseg("predict", images, "-o", tmp_path / "x", "--weights", weights, "--input-scale", "1,1,9")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
        "argument --input-scale: input scale 1,1,9 must lie within 0.25-4 (each factor)")
