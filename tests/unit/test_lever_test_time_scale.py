"""scripts/lever_test_time_scale.py: one real tune run per input scale, on the validation split only."""

import functools
import json

import pytest

from lsmseg.synth.phantom import write_phantom

from ..conftest import lever_config, load_script, make_weights

# The scripts tune the full grid (~200 rows per scale); a few rows show the same thing in seconds.
SMALL_GRID = {"thresholds": (0.3, 0.5), "min_components": (0,), "splits": (0.0,), "floors": ()}


def _config(tmp_path):
    """A config of one cfos_neuron validation phantom and a training phantom (each smaller than the
    network's window at either scale: one forward pass per prediction), and a test split of unreadable files."""
    write_phantom(tmp_path / "validation", "cells", (24, 48, 48), 1)
    write_phantom(tmp_path / "train", "cells", (24, 48, 48), 3)
    return lever_config(tmp_path)


@pytest.fixture
def script(monkeypatch):
    from lsmseg_training.tune import tune

    module = load_script("lever_test_time_scale")
    monkeypatch.setattr(module, "tune", functools.partial(tune, **SMALL_GRID))
    return module


def test_each_scale_is_a_tune_run_at_that_scale_on_validation_only(script, tmp_path, tiny_model_config, tiny_model,
                                                                   capsys):
    config = _config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    out = tmp_path / "out" / "scales.json"
    # 'cfos' is the alias tune takes for cfos_neuron: the script keys its output by the structure's name.
    assert script.main(["-c", str(config), "--weights", str(manifest), "--structures", "cfos",
                        "--scales", "1.0", "1.25", "--out", str(out)]) == 0
    # The run succeeded: the test split's unreadable files were never opened.

    result = json.loads(out.read_text())
    assert result["scales"] == [1.0, 1.25] and set(result["by_structure"]) == {"cfos_neuron"}
    cfos = result["by_structure"]["cfos_neuron"]
    assert set(cfos["runs"]) == set(cfos["best_by_scale"]) == {"1.0", "1.25"}
    rows = {}
    for scale, run in cfos["runs"].items():
        grid = run["validation"]["cfos_neuron"]
        assert grid["volumes"] == ["cells_1"] and cfos["best_by_scale"][scale] == grid["best"]
        assert len(grid["grid"]) == 2 and {row["input_scale"] for row in grid["grid"]} == {float(scale)}
        assert run["per_structure"]["cfos_neuron"]["input_scale"] == float(scale)
        rows[scale] = [(row["dice"], row["panoptic_quality"]) for row in grid["grid"]]
    assert rows["1.0"] != rows["1.25"]  # each scale predicted anew: the resampled input changed the masks
    assert json.loads(capsys.readouterr().out) == {"cfos_neuron": cfos["best_by_scale"]}


def test_per_axis_scales_are_runs_with_readable_keys(script, tmp_path, tiny_model_config, tiny_model):
    """``--scales 1.5 1.5,1,1`` is two runs: one factor on every axis, and z only; JSON keys a reader can
    tell apart, and (1, 1, 1) is scale 1."""
    config = _config(tmp_path)
    manifest = make_weights(tmp_path / "weights", tiny_model_config, tiny_model)
    out = tmp_path / "scales.json"
    assert script.main(["-c", str(config), "--weights", str(manifest), "--scales", "1.5", "1.5,1,1", "1x1x1",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scales"] == [1.5, [1.5, 1.0, 1.0], 1.0]
    runs = result["by_structure"]["cfos_neuron"]["runs"]
    assert list(runs) == ["1.5", "1.5,1.0,1.0", "1.0"]
    assert runs["1.5,1.0,1.0"]["per_structure"]["cfos_neuron"]["input_scale"] == [1.5, 1.0, 1.0]
    grids = {key: [(row["dice"], row["panoptic_quality"]) for row in run["validation"]["cfos_neuron"]["grid"]]
             for key, run in runs.items()}
    assert grids["1.5"] != grids["1.5,1.0,1.0"]  # z alone enlarged: a different input


def test_a_scale_out_of_range_is_a_usage_error_before_any_work(script, tmp_path, capsys):
    # Was a ValueError traceback when tune reached that scale, after every earlier scale's run.
    with pytest.raises(SystemExit) as exc:
        script.main(["-c", str(tmp_path / "missing.yaml"), "--weights", str(tmp_path), "--scales", "1.0", "5",
                     "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2 and "argument --scales: input scale 5 must lie within 0.25-4" in capsys.readouterr().err


def test_a_scale_given_twice_is_a_usage_error_before_any_work(script, tmp_path, capsys):
    # Was: tuned twice (~30 min each on real data), the second run overwriting the first's key.
    with pytest.raises(SystemExit) as exc:
        script.main(["-c", str(tmp_path / "missing.yaml"), "--weights", str(tmp_path), "--scales", "1", "1.5",
                     "1,1,1", "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2 and "--scales: scale 1.0 given more than once" in capsys.readouterr().err
