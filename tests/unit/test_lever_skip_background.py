"""scripts/lever_skip_background.py: the same weights tuned with and without skipping dark windows."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from lsmseg.io import write_volume
from lsmseg.synth.phantom import make_phantom, write_phantom

from ..conftest import lever_config, load_script, make_weights

# The script tunes the full grid (~100 rows each way); a few rows show the same thing in seconds.
SMALL_GRID = {"thresholds": (0.3, 0.5), "min_components": (0,), "splits": (0.0,), "floors": ()}


def _config(tmp_path) -> Path:
    """A config whose validation volume is a phantom beside a field of its own darkest voxels (whole
    windows dark, as in a whole-organ scan), with a training phantom and a test split of unreadable files."""
    phantom = make_phantom("cells", (32, 64, 64), 1)
    dark = np.sort(phantom.image, axis=None)[: phantom.image.size // 4]
    wide = np.random.default_rng(0).choice(dark, (32, 64, 128)).astype(phantom.image.dtype)
    wide[..., :64] = phantom.image
    label = np.zeros(wide.shape, np.uint8)
    label[..., :64] = phantom.label
    write_volume(wide, tmp_path / "validation" / "images" / "wide.tif")
    write_volume(label, tmp_path / "validation" / "labels" / "wide.tif")
    write_phantom(tmp_path / "train", "cells", (32, 64, 64), 3)
    return lever_config(tmp_path)


def test_both_ways_are_tuned_and_recorded_side_by_side_on_validation_only(tmp_path, tiny_model_config, tiny_model,
                                                                         monkeypatch, capsys):
    from lsmseg_training.tune import tune

    from lsmseg.inference import Predictor

    script = load_script("lever_skip_background")
    monkeypatch.setattr(script, "tune", functools.partial(tune, **SMALL_GRID))
    config = _config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model, overlap=0.0)  # 2 windows
    skipping = []  # what each tune run asked the predictor for
    make_predictor = Predictor.from_manifest.__func__

    def spy(cls, *args, **kwargs):
        skipping.append(kwargs["options"].skip_background)
        return make_predictor(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_manifest", classmethod(spy))
    out = tmp_path / "out" / "skip.json"
    assert script.main(["-c", str(config), "--weights", str(manifest), "--structures", "cfos_neuron",
                        "--out", str(out)]) == 0
    # The run succeeded: the test split's unreadable files were never opened.

    assert skipping == [True, False]
    result = json.loads(out.read_text())
    assert set(result) == {"skip_dark_windows", "every_window", "best_side_by_side"}
    rows = {}
    for way in ("skip_dark_windows", "every_window"):
        grid = result[way]["validation"]["cfos_neuron"]
        assert grid["volumes"] == ["wide"] and result["best_side_by_side"]["cfos_neuron"][way] == grid["best"]
        assert len(grid["grid"]) == 2 and all(row["mirror_axes"] == [] for row in grid["grid"])  # no --mirror
        rows[way] = [(row["dice"], row["panoptic_quality"]) for row in grid["grid"]]
    # The network's answers to the dark field's noise are not the uniform prior that skipping blends in.
    assert rows["skip_dark_windows"] != rows["every_window"]
    assert json.loads(capsys.readouterr().out) == result["best_side_by_side"]


def test_mirror_asks_each_way_for_both_mirrorings(tmp_path, monkeypatch):
    # A real mirrored run is 8 network passes per window each way: a stand-in tune records what it is asked.
    from lsmseg_training.tune import MIRROR_ALL

    script = load_script("lever_skip_background")
    asked = []

    def recording_tune(config, weights, mirrors, structures, where, skip_background):
        asked.append((mirrors, skip_background))
        return {"validation": {"blood_vessel": {"best": {"score": 0.5 if skip_background else 0.25}}}}

    monkeypatch.setattr(script, "tune", recording_tune)
    monkeypatch.setattr(script, "load_run_config", lambda kind, path: None)
    out = tmp_path / "skip.json"
    assert script.main(["-c", str(tmp_path / "c.yaml"), "--weights", str(tmp_path), "--mirror", "--out", str(out)]) == 0
    assert asked == [(((), MIRROR_ALL), True), (((), MIRROR_ALL), False)]
    assert json.loads(out.read_text())["best_side_by_side"] == {"blood_vessel": {"skip_dark_windows": {"score": 0.5},
                                                                                 "every_window": {"score": 0.25}}}


def test_a_bad_config_is_one_line_naming_it(tmp_path):
    script = load_script("lever_skip_background")
    with pytest.raises(SystemExit, match=r"^ERROR: .*missing\.yaml: config file not found$"):
        script.main(["-c", str(tmp_path / "missing.yaml"), "--weights", str(tmp_path), "--out", str(tmp_path / "o.json")])
